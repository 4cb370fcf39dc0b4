"""Project-wide pytest settings: markers shared by unit and integration tests, and the slowest
tests listed at the end of every run (CI's time is watched: this says where it goes)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); "
                                       "run with `pytest -m gpu` on a GPU machine")
    if config.option.durations is None:  # unless --durations was given
        config.option.durations, config.option.durations_min = 30, 5.0
