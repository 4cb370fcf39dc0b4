"""The versions a benchmark's figures were measured with, recorded beside them."""
import importlib
import platform

MODULES = {"torch": "torch", "deepspeed": "deepspeed", "dali": "nvidia.dali", "open_clip": "open_clip",
           "streaming": "streaming", "pillow": "PIL"}


def versions(*names: str) -> dict:
    """{"python": ..., name: version} for each of `names`, keys of MODULES."""
    return {"python": platform.python_version(),
            **{name: importlib.import_module(MODULES[name]).__version__ for name in names}}
