"""Skipping the tests of real infrastructure (SLURM, network namespaces) where it cannot run,
so that the reason shows in a quiet run's summary (`pytest -q` lists warnings, not skips)."""
import warnings

import pytest


def skip_loudly(reason: str):
    warnings.warn(reason, pytest.PytestWarning, stacklevel=2)
    pytest.skip(reason)
