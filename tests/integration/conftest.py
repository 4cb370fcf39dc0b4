import os

import pytest


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """One dataset cache for the whole session, outside the user's home."""
    env = dict(os.environ, CLIPZERO_CACHE=str(tmp_path_factory.mktemp("cache")))
    return env
