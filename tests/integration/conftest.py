import os

import pytest

# Session fixtures of real infrastructure: a SLURM cluster, two hosts in network namespaces.
from slurm_cluster import slurm_cluster  # noqa: F401
from two_hosts import four_hosts, two_hosts  # noqa: F401


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """One dataset cache for the whole session, outside the user's home."""
    env = dict(os.environ, CLIPZERO_CACHE=str(tmp_path_factory.mktemp("cache")))
    return env


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory, cache_env):
    """REFERENCE_DIALS on 2 ranks of one host (torchrun), never interrupted: its run
    directory, and the samples each rank took (CLIPZERO_SAMPLE_LOG) under run/samples."""
    from launching import REFERENCE_DIALS, check, launch

    out = tmp_path_factory.mktemp("reference") / "run"
    env = {**cache_env, "CLIPZERO_SAMPLE_LOG": str(out / "samples")}
    check(launch([*REFERENCE_DIALS, "--out", str(out)], env, ranks=2))
    return out
