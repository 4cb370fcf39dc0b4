"""On a GPU (the `gpu` marker): training decodes its JPEGs with DALI's nvJPEG ("mixed" decode,
at the plan's share for the hardware decoder), and JPEGs broken past their header are replaced
and counted as on the CPU (the record check finds them before any decoder sees them)."""
import io
import json

import numpy as np
import pytest
import torch

from launching import check, launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _jpeg_mds(path, samples=256, broken_every=8) -> None:
    """Photos of 128x96 flat colours with noise; every 8th has its entropy-coded data scrambled
    (the header intact, so the record check passes it on to the decoder)."""
    from PIL import Image
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    with MDSWriter(out=str(path), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for index in range(samples):
            colour = index % 4
            pixels = np.clip(np.eye(4, 3)[colour] * 200 + rng.normal(40, 20, (96, 128, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            data = bytearray(buffer.getvalue())
            if index % broken_every == 3:
                start = data.find(b"\xff\xda") + 20
                data[start:-2] = rng.integers(0, 256, len(data) - start - 2, dtype=np.uint8).tobytes()
            writer.write({"jpg": bytes(data), "txt": f"a photo of colour {colour}"})


def test_training_decodes_on_the_gpu_through_broken_jpegs(tmp_path, cache_env):
    from engine.plan.decode import HW_DECODER_LOAD, has_hw_jpeg_decoder
    from engine.plan.hardware import probe

    data, out = tmp_path / "photos", tmp_path / "run"
    _jpeg_mds(data)
    # torch's fused AdamW: DeepSpeed's, where the plan picks it, first compiles its extension,
    # minutes that this test of the data path does not need.
    result = launch(["--data", str(data), "--global-batch", "32", "--steps", "12", "--log-every", "4",
                     "--optimizer", "torch_fused", "--out", str(out)], cache_env)
    check(result)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["decode_device"] == "gpu"
    assert plan["hw_decoder_load"] == (HW_DECODER_LOAD if has_hw_jpeg_decoder(probe()) else 0.0)
    logged = [row for row in read_metrics(out) if "loss" in row]
    assert len(logged) == 3 and all(np.isfinite([row["loss"] for row in logged]))
    assert logged[-1]["data/bad_records/truncated_or_corrupt_image"] >= 256 // 8   # at least a whole epoch's
    assert "bad records replaced by stand-ins:" in result.stdout
