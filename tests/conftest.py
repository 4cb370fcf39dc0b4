import pytest

from engine.data.embedded import ensure_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The built-in digits dataset, written once per test session into a temporary cache."""
    return ensure_digits(tmp_path_factory.mktemp("clipzero-cache"))
