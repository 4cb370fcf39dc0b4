"""TrainLoader on the digits data: real StreamingDataset, DataLoader workers and DALI CPU pipeline."""
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import LocalDataset, MDSWriter

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.data.loader import TrainLoader
from engine.data.text import ClipTokenizer
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]
MICRO_BATCH = 64   # 1,497 training digits -> 23 full batches per epoch on one rank
RESUME_AT = 20     # state taken here; the batches after it cross into epoch 1
TAKE = 26


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _loader(data, tokenizer, workers=2, **overrides):
    options = dict(micro_batch=MICRO_BATCH, image_size=24, crop_scale=(0.4, 1.0), seed=11, workers=workers,
                   decode_device="cpu", tokenizer=tokenizer, rank=0, world_size=1)
    options.update(overrides)
    return TrainLoader(str(data), **options)


def _take(loader, count):
    return [{k: v.clone() for k, v in batch.items()} for batch in islice(iter(loader), count)]


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for index, (a, b) in enumerate(zip(left, right)):
        assert torch.equal(a["sample_id"], b["sample_id"]), f"sample ids differ at batch {index}"
        assert torch.equal(a["text"], b["text"]), f"text differs at batch {index}"
        assert torch.equal(a["image"], b["image"]), f"pixels differ at batch {index}"


@pytest.fixture(scope="module")
def reference(digits, tokenizer):
    """TAKE batches from one loader, with its state recorded after RESUME_AT of them."""
    loader = _loader(digits.train, tokenizer)
    assert loader.batches_per_epoch == 23 and loader.samples_per_epoch == 23 * MICRO_BATCH
    batches, states = [], []
    for batch in islice(iter(loader), TAKE):
        batches.append({k: v.clone() for k, v in batch.items()})
        states.append(loader.state_dict())
    return batches, states


def test_batches_have_the_promised_form(reference, tokenizer):
    batch = reference[0][0]
    assert batch["image"].shape == (MICRO_BATCH, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (MICRO_BATCH, 77) and (batch["text"][:, 0] == tokenizer.sot_id).all()
    assert batch["sample_id"].dtype == torch.long
    assert -2.0 < batch["image"].min() and batch["image"].max() < 2.2  # CLIP-normalised, not 0..255


def test_each_epoch_is_a_fresh_permutation_without_repeats(reference):
    batches, states = reference
    epoch0 = torch.cat([b["sample_id"] for b in batches[:23]])
    assert len(set(epoch0.tolist())) == 23 * MICRO_BATCH and epoch0.max() < 1497
    assert states[21] == {**states[21], "epoch": 0, "batch_in_epoch": 22}
    assert states[22]["epoch"] == 1 and states[22]["batch_in_epoch"] == 0
    assert not torch.equal(batches[23]["sample_id"], batches[0]["sample_id"])


def test_fresh_loader_with_same_arguments_repeats_the_batches(reference, digits, tokenizer):
    _assert_same_batches(_take(_loader(digits.train, tokenizer), TAKE), reference[0])


def test_number_of_workers_does_not_change_the_batches(reference, digits, tokenizer):
    _assert_same_batches(_take(_loader(digits.train, tokenizer, workers=0), TAKE), reference[0])


def test_resume_continues_exactly_across_the_epoch_boundary(reference, digits, tokenizer):
    batches, states = reference
    resumed = _loader(digits.train, tokenizer, workers=1)
    resumed.load_state_dict(json.loads(json.dumps(states[RESUME_AT - 1])))
    _assert_same_batches(_take(resumed, TAKE - RESUME_AT), batches[RESUME_AT:])
    # The same loader, now in epoch 1, goes back to the saved position just as well.
    resumed.load_state_dict(states[RESUME_AT - 1])
    _assert_same_batches(_take(resumed, TAKE - RESUME_AT), batches[RESUME_AT:])


def test_different_seed_gives_different_order(reference, digits, tokenizer):
    other = _take(_loader(digits.train, tokenizer, seed=12), 1)
    assert not torch.equal(other[0]["sample_id"], reference[0][0]["sample_id"])


def test_resume_refuses_a_state_from_another_setup(reference, digits, tokenizer):
    loader = _loader(digits.train, tokenizer, micro_batch=32)
    with pytest.raises(UserError, match="micro_batch was 64, now 32"):
        loader.load_state_dict(reference[1][0])


def test_images_and_text_belong_to_their_sample_id(digits, tokenizer):
    # Crop scale 1 on square images is the whole image, and 32 px is the stored size: the loader's
    # pixels must be the stored PNG's pixels, and its tokens the stored caption's.
    loader = _loader(digits.train, tokenizer, workers=1, micro_batch=16, image_size=32, crop_scale=(1.0, 1.0))
    stored = LocalDataset(local=str(digits.train))
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    for batch in _take(loader, 2):
        for image, text, sample_id in zip(batch["image"], batch["text"], batch["sample_id"].tolist()):
            sample = stored[sample_id]
            png = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64)
            pixels = (image * std + mean).permute(1, 2, 0).double().numpy()
            np.testing.assert_allclose(pixels, png, atol=1e-3)
            assert torch.equal(text, tokenizer([sample["txt"]])[0])


def test_undecodable_images_are_replaced_and_counted(tmp_path, tokenizer):
    good = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good, format="PNG")
    good = good.getvalue()
    broken = {5: b"not an image", 17: good[: len(good) // 2]}  # caught by the header check / by DALI
    with MDSWriter(out=str(tmp_path / "mds"), columns={"jpg": "bytes", "txt": "str"}) as writer:
        for index in range(40):
            writer.write({"jpg": broken.get(index, good), "txt": f"red square {index}"})
    loader = _loader(tmp_path / "mds", tokenizer, workers=1, micro_batch=8, image_size=16)
    batches = _take(loader, loader.batches_per_epoch)
    assert [len(b["sample_id"]) for b in batches] == [8] * 5
    assert loader.undecodable_images == 2
    for batch in batches:
        for image, sample_id in zip(batch["image"], batch["sample_id"].tolist()):
            is_placeholder = image.abs().max() < 0.02  # the mean colour normalises to about zero
            assert bool(is_placeholder) == (sample_id in broken)


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from engine.data.loader import TrainLoader
    from engine.data.text import ClipTokenizer

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loader = TrainLoader(sys.argv[1], micro_batch=64, image_size=16, crop_scale=(0.4, 1.0), seed=3, workers=1,
                         decode_device="cpu", tokenizer=ClipTokenizer(), rank=rank, world_size=2)
    ids = [batch["sample_id"].tolist() for _, batch in zip(range(loader.batches_per_epoch + 1), loader)]
    json.dump({"batches_per_epoch": loader.batches_per_epoch, "ids": ids}, open(sys.argv[2], "w"))
    dist.barrier()
""")


def test_two_ranks_see_disjoint_samples(digits, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in range(2):
        # What the deepspeed launcher exports (it names the ranks per node LOCAL_SIZE).
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        env.pop("LOCAL_WORLD_SIZE", None)
        ranks.append(subprocess.Popen([sys.executable, str(script), str(digits.train), str(tmp_path / f"{rank}.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    per_epoch = results[0]["batches_per_epoch"]
    assert per_epoch == results[1]["batches_per_epoch"] == 1497 // 2 // 64
    epoch0 = [{i for batch in r["ids"][:per_epoch] for i in batch} for r in results]
    assert len(epoch0[0]) == len(epoch0[1]) == per_epoch * 64  # no repeats within a rank
    assert not epoch0[0] & epoch0[1]
    assert len(results[0]["ids"]) == per_epoch + 1  # and the epoch rolls over
