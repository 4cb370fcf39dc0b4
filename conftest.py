"""Project-wide pytest settings: markers shared by unit and integration tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); "
                                       "run with `pytest -m gpu` on a GPU machine")
