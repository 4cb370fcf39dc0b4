"""TrainLoader on the digits data: real StreamingDataset, DataLoader workers and DALI CPU pipeline."""
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import LocalDataset

from engine.data.augment import ViewBatch, random_resized_crop
from engine.data.collate import PrepareBatch
from engine.data.cpu_pipeline import cpu_train_pipeline
from engine.data.eda import Eda
from engine.data.dali import CLIP_MEAN, CLIP_STD, DecodedBatches, HostBatch
from engine.data.loader import TrainLoader
from engine.data.mlm import IGNORE_INDEX, MASK_ID
from engine.data.records import BAD_RECORDS_KEY, IMAGE_SIZE_KEY, SAMPLE_ID_KEY
from engine.data.spec import DataSpec
from engine.data.text import ClipTokenizer
from engine.data.wordnet import find_wordnet

REPO = Path(__file__).resolve().parents[2]
MICRO_BATCH = 64   # 1,497 training digits -> 23 full batches per epoch on one rank
RESUME_AT = 20     # state taken here; the batches after it cross into epoch 1
TAKE = 26


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _loader(data, tokenizer, workers=2, **overrides):
    options = dict(micro_batch=MICRO_BATCH, image_size=24, spec=DataSpec(crop_scale=(0.4, 1.0)), seed=11,
                   workers=workers, decode_device="cpu", tokenizer=tokenizer, rank=0, world_size=1)
    options.update(overrides)
    return TrainLoader.from_data(str(data), **options)


def _take(loader, count):
    return [{k: v.clone() for k, v in batch.items()} for batch in islice(iter(loader), count)]


def _assert_same_batches(left, right):
    assert len(left) == len(right)
    for index, (a, b) in enumerate(zip(left, right)):
        assert list(a) == list(b), f"keys differ at batch {index}"
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs at batch {index}"


@pytest.fixture(scope="module")
def reference(digits, tokenizer):
    """TAKE batches from one loader, with its state recorded after RESUME_AT of them."""
    loader = _loader(digits.train, tokenizer)
    assert loader.steps_per_epoch == loader.batches_per_epoch == 23 and loader.global_batch == MICRO_BATCH
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
    assert states[21] == {**states[21], "epoch": 0, "sample_in_epoch": 22 * MICRO_BATCH}
    assert states[22]["epoch"] == 1 and states[22]["sample_in_epoch"] == 0
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


def test_crop_path_is_the_clip_pipeline_of_before(reference, digits, tokenizer):
    # CLIP's batches must not change with DataSpec: windows drawn from (seed, epoch, sample id) by
    # torchvision's rule, the crop window decoded, resized in uint8 (by torch on the CPU,
    # cpu_pipeline.py), normalised; captions as given.
    batch = reference[0][0]
    stored = LocalDataset(local=str(digits.train))
    samples = [stored[i] for i in batch["sample_id"].tolist()]
    windows = [random_resized_crop(32, 32, (0.4, 1.0), np.random.default_rng((11, 0, i)))
               for i in batch["sample_id"].tolist()]
    host = HostBatch([np.frombuffer(s["jpg"], np.uint8) for s in samples], None,
                     (ViewBatch(np.stack([a for a, _ in windows]), np.stack([s for _, s in windows]), {}),))
    build = lambda source: cpu_train_pipeline(source, batch_size=MICRO_BATCH, image_size=24, num_threads=1)
    [((images,), _)] = list(DecodedBatches(iter([host]), build=build, device=torch.device("cpu")))
    assert torch.equal(batch["image"], images)
    assert torch.equal(batch["text"], tokenizer([s["txt"] for s in samples]))


DECLIP = DataSpec(image_views=2, augment="moco_v2", crop_scale=(0.2, 1.0), text_aug=True, mlm=True)
DECLIP_TAKE, DECLIP_RESUME_AT = 5, 3


@pytest.fixture(scope="module")
def declip_reference(digits, tokenizer):
    """DECLIP_TAKE batches of DeCLIP's spec, with the loader's state after each."""
    loader = _loader(digits.train, tokenizer, spec=DECLIP, wordnet=find_wordnet())
    assert (loader.eda.wordnet is not None) == (find_wordnet() is not None)
    batches, states = [], []
    for batch in islice(iter(loader), DECLIP_TAKE):
        batches.append({k: v.clone() for k, v in batch.items()})
        states.append(loader.state_dict())
    return batches, states


def test_declip_batches_hold_two_views_masked_text_and_an_eda_copy(declip_reference):
    for batch in declip_reference[0]:
        assert tuple(batch) == DECLIP.batch_keys
        assert batch["image2"].shape == batch["image"].shape == (MICRO_BATCH, 3, 24, 24)
        assert batch["mlm_labels"].shape == batch["text_aug"].shape == batch["text"].shape == (MICRO_BATCH, 77)
        differs = (batch["image"] - batch["image2"]).abs().flatten(1).mean(1)
        assert (differs > 0.01).all()  # two views of one image, never the same


def test_declip_resume_mid_epoch_repeats_every_key(declip_reference, digits, tokenizer):
    batches, states = declip_reference
    resumed = _loader(digits.train, tokenizer, spec=DECLIP, wordnet=find_wordnet(), workers=1)
    resumed.load_state_dict(states[DECLIP_RESUME_AT - 1])
    _assert_same_batches(_take(resumed, DECLIP_TAKE - DECLIP_RESUME_AT), batches[DECLIP_RESUME_AT:])


def test_declip_batches_do_not_depend_on_the_worker_count(declip_reference, digits, tokenizer):
    in_process = _loader(digits.train, tokenizer, spec=DECLIP, wordnet=find_wordnet(), workers=0)
    _assert_same_batches(_take(in_process, 2), declip_reference[0][:2])


def test_mlm_labels_hold_the_tokens_the_masking_replaced(declip_reference, digits, tokenizer):
    stored = LocalDataset(local=str(digits.train))
    chosen_total = eligible_total = masked_total = 0
    for batch in declip_reference[0]:
        original = tokenizer([stored[i]["txt"] for i in batch["sample_id"].tolist()])
        chosen = batch["mlm_labels"] != IGNORE_INDEX
        assert torch.equal(batch["mlm_labels"][chosen], original[chosen])
        assert torch.equal(batch["text"][~chosen], original[~chosen])
        special = (original == tokenizer.sot_id) | (original == tokenizer.eot_id) | (original == tokenizer.pad_id)
        assert not (chosen & special).any()
        replaced = batch["text"][chosen]
        assert not ((replaced == tokenizer.sot_id) | (replaced == tokenizer.eot_id) | (replaced > MASK_ID)).any()
        chosen_total += int(chosen.sum())
        eligible_total += int((~special).sum())
        masked_total += int((batch["text"][chosen] == MASK_ID).sum())
    assert 0.10 < chosen_total / eligible_total < 0.20 and 0.7 < masked_total / chosen_total < 0.9


def test_eda_copy_differs_for_some_captions_and_is_never_empty(declip_reference, digits, tokenizer):
    stored = LocalDataset(local=str(digits.train))
    changed = 0
    for batch in declip_reference[0]:
        original = tokenizer([stored[i]["txt"] for i in batch["sample_id"].tolist()])
        assert ((batch["text_aug"] != tokenizer.pad_id).sum(1) >= 3).all()  # start, a word, end
        changed += int((batch["text_aug"] != original).any(1).sum())
    assert changed > len(declip_reference[0]) * MICRO_BATCH // 4


def _checked_sample(image: bytes, caption: str, sample_id: int) -> dict:
    """A sample as the dataset hands it to PrepareBatch (engine/data/records.py), image unusable."""
    return {"jpg": image, "txt": caption, SAMPLE_ID_KEY: sample_id, IMAGE_SIZE_KEY: None, BAD_RECORDS_KEY: []}


def test_prepare_batch_keeps_a_word_of_the_shortest_captions(tokenizer):
    # The worker step alone (no decoding): one-word captions, over many epochs of EDA draws.
    captions = ["cat", "a", "Dog!", "...", "x", "two words", "the of a"]
    samples = [_checked_sample(b"not an image", caption, i) for i, caption in enumerate(captions)]
    spec = DataSpec(text_aug=True, mlm=True)
    for epoch in range(30):
        prepare = PrepareBatch(tokenizer, spec, seed=0, epoch=epoch, eda=Eda(None, 0))
        payload = prepare(samples).payload
        assert ((payload.text_aug != tokenizer.pad_id).sum(1) >= 3).all(), epoch
        assert torch.equal(payload.text_aug, prepare(samples).payload.text_aug)


def test_clip_lite_text_is_lower_cased_without_punctuation(tokenizer):
    samples = [_checked_sample(b"", "A Dog's ball, (RED)!", 0), _checked_sample(b"", "black-and-white/grey photo.", 1)]
    prepare = PrepareBatch(tokenizer, DataSpec(augment="crop_jitter", strip_punctuation=True), seed=0, epoch=0)
    payload = prepare(samples).payload
    assert torch.equal(payload.text, tokenizer(["a dogs ball red", "black and white grey photo"]))


def test_images_and_text_belong_to_their_sample_id(digits, tokenizer):
    # Crop scale 1 on square images is the whole image, and 32 px is the stored size: the loader's
    # pixels must be the stored PNG's pixels, and its tokens the stored caption's.
    loader = _loader(digits.train, tokenizer, workers=1, micro_batch=16, image_size=32,
                     spec=DataSpec(crop_scale=(1.0, 1.0)))
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


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from engine.data.loader import TrainLoader
    from engine.data.spec import DataSpec
    from engine.data.text import ClipTokenizer

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loader = TrainLoader.from_data(sys.argv[1], micro_batch=64, image_size=16, spec=DataSpec(crop_scale=(0.4, 1.0)), seed=3,
                                   workers=1, decode_device="cpu", tokenizer=ClipTokenizer(), rank=rank, world_size=2)
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


# A worker that runs the garbage collector while the parent holds a dead DALI pipeline in a
# reference cycle: the pipeline's finalizer would join threads that exist only in the parent.
DEAD_PIPELINE_SCRIPT = textwrap.dedent("""
    import gc, torch
    from torch.utils.data import DataLoader, Dataset
    from engine.data.cpu_pipeline import eval_pipeline
    from engine.data.dali import PLACEHOLDER_PNG
    from engine.data.workers import start_workers

    for _ in range(3):
        pipe = eval_pipeline(lambda: ([PLACEHOLDER_PNG] * 4,), batch_size=4, image_size=16, num_threads=2)
        pipe.build()
        pipe.run()
        pipe.cycle = pipe  # garbage that only the collector can free
        del pipe

    class Collecting(Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, index):
            return torch.tensor(gc.collect())

    # A worker that collects them segfaults or hangs: the timeout turns a hang into an error.
    loader = DataLoader(Collecting(), batch_size=2, num_workers=1, multiprocessing_context="fork", timeout=60)
    print("batches", len(list(start_workers(loader))))
""")


def test_workers_never_collect_the_parents_dead_dali_pipelines(tmp_path):
    script = tmp_path / "dead_pipeline.py"
    script.write_text(DEAD_PIPELINE_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "batches 4" in result.stdout, result.stderr[-3000:]


def test_a_stalled_source_ends_the_run_after_the_batch_timeout(digits, tokenizer, monkeypatch):
    # The data workers' reads stop answering (each one here sleeps past the limit, as a remote
    # store that accepts a connection and never replies): the loader raises, naming the limit and
    # what to check, instead of waiting forever. Forked workers inherit the patched read.
    import engine.data.records as records

    monkeypatch.setattr(records.StreamingDatasetWithIds, "get_item", lambda self, *args, **kwargs: time.sleep(20))
    loader = _loader(digits.train, tokenizer, workers=1, collective_timeout_s=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no batch came from the data workers within 2 s.*collective-timeout"):
        next(iter(loader))
    assert time.monotonic() - start < 15
