"""Whether DeepSpeed's FusedAdam is offered on a GPU machine (engine/plan/optimizer.py): its
builder says yes everywhere, but without a prebuilt op it compiles at start-up, which needs an
nvcc of torch's CUDA major version and ninja."""
import pytest
import torch
from torch.utils import cpp_extension

from engine.plan.optimizer import _deepspeed_fused_adam


def _cuda_home(tmp_path, release: str | None):
    """A CUDA_HOME whose bin/nvcc reports `release` (None: no nvcc there, a runtime-only install)."""
    (tmp_path / "bin").mkdir()
    if release is not None:
        nvcc = tmp_path / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
        nvcc.chmod(0o755)
    return str(tmp_path)


@pytest.mark.parametrize("release, compiles", [(None, False), ("7.5", False), ("torch", True)])
def test_fused_adam_compiles_only_with_an_nvcc_of_torchs_cuda_major(tmp_path, monkeypatch, release, compiles):
    major = (torch.version.cuda or "12.4").split(".")[0]
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _cuda_home(tmp_path, f"{major}.2" if release == "torch" else release))
    prebuilt, compilable = _deepspeed_fused_adam()
    assert compilable == (compiles and cpp_extension.is_ninja_available())
    from deepspeed.git_version_info import installed_ops
    assert prebuilt == bool(installed_ops.get("fused_adam"))
