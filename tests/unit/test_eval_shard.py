"""Evaluation split over the ranks (engine/eval/shard.py): the block arithmetic, forwards kept in
step by padding, and two real gloo ranks scoring a held-out MDS set, an image folder and a
Karpathy file whose bad records sit in one rank's block (the whole of it, for the folder): both
ranks must end with the one-process embeddings and metrics, in the same number of forwards."""
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from engine.dist import free_port
from engine.errors import EvaluationInterrupted
from engine.eval.shard import ALONE, Ranks, encode_in_step

HELD_OUT = 41           # samples: blocks of 21 and 20
BAD_HELD_OUT = {2: "image", 5: "image", 7: "caption", 30: "image"}   # 3 in rank 0's block, 1 in rank 1's
PROBE = 24              # more than rank 0's 18 kept samples: the probe's rows come from both ranks
GOOD_FILES = 20         # the folder: 2 per class, then 21 broken files (all of rank 1's block, and one more)
BROKEN_FILES = 21
TEMPLATES = "simple"    # 7 templates x 10 classes: prompts split 35 and 35


# ---------------------------------------------------------------- the blocks

@pytest.mark.parametrize("count, world, blocks", [
    (10, 4, [(0, 3), (3, 6), (6, 9), (9, 10)]),     # not divisible: the last block shorter
    (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),       # divisible
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),       # fewer items than ranks: empty blocks
    (0, 3, [(0, 0), (0, 0), (0, 0)]),               # nothing at all
    (5, 1, [(0, 5)]),
])
def test_blocks_are_contiguous_of_the_common_length(count, world, blocks):
    ranks = [Ranks(rank, world) for rank in range(world)]
    assert [(r.block(count).start, r.block(count).stop) for r in ranks] == blocks
    assert all(r.block_length(count) == -(-count // world) for r in ranks)
    assert [i for r in ranks for i in r.block(count)] == list(range(count))


def test_alone_pads_nothing():
    assert ALONE.padded_rows(10) is None and Ranks(0, 1).padded_rows(10) is None
    assert Ranks(1, 4).padded_rows(10) == 3 and Ranks(3, 4).padded_rows(0) == 0


# ---------------------------------------------------------------- forwards in step

class Recorder:
    """An encoder that records the rows of each forward: the row sums, as one-column outputs."""

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.lengths.append(len(batch))
        return batch.sum(1, keepdim=True)


def test_a_short_block_is_padded_to_the_same_forwards_and_the_padding_dropped():
    chunks = [torch.arange(6.).reshape(3, 2), torch.empty(0, 2), torch.arange(6., 16.).reshape(5, 2)]
    asked, encode = [], Recorder()
    out = encode_in_step(encode, chunks, rows=10, window=4, filler=lambda: torch.full((1, 2), -1.0),
                         device="cpu", interrupted=lambda: asked.append(1) or False)
    assert encode.lengths == [4, 4, 2] and len(asked) == 3       # ceil(10 / 4) forwards, whatever the rows
    assert out.squeeze(1).tolist() == torch.arange(16.).reshape(8, 2).sum(1).tolist()
    nothing = Recorder()                                           # a rank with no rows at all
    assert len(encode_in_step(nothing, [], rows=10, window=4, filler=lambda: torch.zeros(1, 2), device="cpu",
                              interrupted=None)) == 0 and nothing.lengths == [4, 4, 2]


def test_alone_the_forwards_are_the_rows_cut_by_the_window():
    encode = Recorder()
    out = encode_in_step(encode, [torch.ones(3, 2), torch.ones(6, 2)], rows=None, window=4,
                         filler=lambda: pytest.fail("no padding alone"), device="cpu", interrupted=None)
    assert encode.lengths == [4, 4, 1] and len(out) == 9


def test_too_many_rows_and_an_agreed_stop_are_refused():
    with pytest.raises(ValueError, match="more rows"):
        encode_in_step(Recorder(), [torch.ones(6, 2)], rows=5, window=4, filler=lambda: torch.zeros(1, 2),
                       device="cpu", interrupted=None)
    with pytest.raises(EvaluationInterrupted):
        encode_in_step(Recorder(), [torch.ones(6, 2)], rows=6, window=4, filler=lambda: torch.zeros(1, 2),
                       device="cpu", interrupted=lambda: True)


# ---------------------------------------------------------------- two real ranks

def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sets(tmp_path_factory, digits):
    """A held-out MDS set, an ImageFolder and a Karpathy file made of held-out digits, their bad
    records where the blocks of two ranks put them."""
    import numpy as np
    from streaming import LocalDataset, MDSWriter

    root = tmp_path_factory.mktemp("shard")
    stored = LocalDataset(local=str(digits.heldout))
    samples = [stored[i] for i in range(HELD_OUT)]
    broken = b"\x89PNG\r\n\x1a\n broken"
    mds = root / "heldout"
    with MDSWriter(out=str(mds), columns={"jpg": "bytes", "txt": "str", "cls": "int"}) as writer:
        for i, sample in enumerate(samples):
            bad = BAD_HELD_OUT.get(i)
            writer.write({"jpg": broken if bad == "image" else sample["jpg"],
                          "txt": "  " if bad == "caption" else f"{sample['txt']} (sample {i})",  # no two alike
                          "cls": sample["cls"]})
    (mds / "classes.json").write_text((digits.heldout / "classes.json").read_text())
    small = root / "small"   # 5 samples: rank 1's block (3 and 4) all bad, its image and its caption
    with MDSWriter(out=str(small), columns={"jpg": "bytes", "txt": "str", "cls": "int"}) as writer:
        for i, sample in enumerate(samples[:5]):
            writer.write({"jpg": broken if i == 3 else sample["jpg"], "txt": "" if i == 4 else f"small {i}",
                          "cls": sample["cls"]})

    folder = root / "folder"
    by_class: dict[int, int] = {}
    for i in range(len(stored)):
        sample = stored[i]
        if by_class.get(sample["cls"], 0) < GOOD_FILES // 10:
            by_class[sample["cls"]] = by_class.get(sample["cls"], 0) + 1
            (folder / f"{sample['cls']:02d}").mkdir(parents=True, exist_ok=True)
            (folder / f"{sample['cls']:02d}" / f"{i:04d}.png").write_bytes(sample["jpg"])
    for j in range(BROKEN_FILES):   # sorted after every good file: the end of the listing
        (folder / "09" / f"zz{j:02d}.png").write_bytes(broken)
    all_bad = root / "all_bad"
    (all_bad / "00").mkdir(parents=True)
    for j in range(3):
        (all_bad / "00" / f"{j}.png").write_bytes(broken)

    images = root / "karpathy"
    images.mkdir()
    entries = []
    for i in range(15):   # 1 to 3 captions each; 3 of rank 1's block (images 8..14) broken
        (images / f"{i}.png").write_bytes(broken if i in (9, 11, 12) else
                                          _png(np.asarray(Image.open(io.BytesIO(samples[i]["jpg"])))))
        entries.append({"filepath": "karpathy", "filename": f"{i}.png", "split": "test",
                        "sentences": [{"raw": f"{samples[i]['txt']}, take {k} of {i}"} for k in range(1 + i % 3)]})
    karpathy = root / "dataset_test.json"
    karpathy.write_text(json.dumps({"images": entries}))
    return {"mds": mds, "small": small, "folder": folder, "all_bad": all_bad, "karpathy": karpathy}


def _model(weights: Path):
    from engine.data.text import ClipTokenizer
    from engine.objectives.method import lookup
    from engine.models.two_tower import TwoTower

    tokenizer = ClipTokenizer(32)
    model = TwoTower(lookup("clip", "debug").preset, tokenizer.eot_id, tokenizer.sot_id)
    model.load_state_dict(torch.load(weights))
    return model.eval(), tokenizer


def _evaluate_everything(sets: dict, weights: Path, ranks: Ranks, interrupted=None) -> dict:
    """Every split evaluation on these sets, with what it encoded: one process or one rank."""
    from engine.eval.eval_set import load_eval_set
    from engine.errors import UserError
    from engine.eval.benchmark import (RetrievalSet, ZeroShotSet, encode_image_files, score_retrieval,
                                       score_zeroshot)
    from engine.eval.evaluate import evaluate, held_out_embeddings
    from engine.eval.load_run import LoadedRun
    from engine.eval.shard import first_rows

    model, tokenizer = _model(weights)
    forwards = []
    for name in ("encode_image", "encode_text"):
        encode = getattr(model, name)
        setattr(model, name, lambda batch, encode=encode, name=name: forwards.append((name, len(batch))) or
                encode(batch))
    run = LoadedRun(model=model, tokenizer=tokenizer, clean_text=None, plan={"method": "clip", "model": "debug"},
                    run_dir=None, checkpoint=None, step=0, image_size=32)
    out: dict = {}
    held_out = load_eval_set(sets["mds"], 32, ranks)
    out["held_out_rows"] = (held_out.ids.tolist(), len(held_out.images), len(held_out.captions))
    out["held_out"] = held_out_embeddings(model, held_out, tokenizer, "cpu", interrupted)
    out["held_out_metrics"] = evaluate(model, held_out, tokenizer, torch.device("cpu"), interrupted=interrupted)
    out["probe"] = first_rows(held_out.images, held_out.captions, PROBE, ranks, "cpu")
    folder = ZeroShotSet.open(str(sets["folder"]), templates=TEMPLATES)
    out["folder"] = encode_image_files(run, folder.folder.files, "folder", "cpu", interrupted, ranks=ranks)
    zeroshot = score_zeroshot(run, folder, "cpu", interrupted, ranks)
    out["zeroshot"] = (zeroshot.metrics, zeroshot.counts)
    for key in ("karpathy", "mds", "small"):
        result = score_retrieval(run, RetrievalSet.open(str(sets[key])), "cpu", interrupted, ranks)
        out[key] = (result.metrics, result.counts)
    try:
        score_zeroshot(run, ZeroShotSet.open(str(sets["all_bad"])), "cpu", interrupted, ranks)
    except UserError as error:
        out["all_bad"] = str(error)
    out["forwards"] = forwards
    return out


def _rank(rank: int, world: int, port: int, sets: dict, weights: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)   # two ranks on the test machine's cores
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=120))
    asked = []

    def interrupted() -> bool:   # the stop agreement's shape: an all-reduce every rank must join
        flag = torch.zeros(1)
        torch.distributed.all_reduce(flag)
        asked.append(1)
        return bool(flag.item())

    try:
        result = _evaluate_everything(sets, weights, Ranks(rank, world), interrupted)
        result["asked"] = len(asked)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def evaluated(sets, tmp_path_factory):
    from engine.data.text import ClipTokenizer
    from engine.objectives.method import lookup
    from engine.models.two_tower import TwoTower

    out = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(3)
    tokenizer = ClipTokenizer(32)
    weights = out / "weights.pt"
    torch.save(TwoTower(lookup("clip", "debug").preset, tokenizer.eot_id, tokenizer.sot_id).state_dict(),
               weights)
    mp.spawn(_rank, args=(2, free_port(), sets, weights, out), nprocs=2)
    one = _evaluate_everything(sets, weights, ALONE)
    return one, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_each_rank_holds_only_its_block_of_the_held_out_set(evaluated):
    one, ranks = evaluated
    assert ranks[0]["held_out_rows"] == ([i for i in range(21) if i not in BAD_HELD_OUT], 18, 18)
    assert ranks[1]["held_out_rows"] == ([i for i in range(21, HELD_OUT) if i not in BAD_HELD_OUT], 19, 19)
    assert one["held_out_rows"][0] == ranks[0]["held_out_rows"][0] + ranks[1]["held_out_rows"][0]


def test_both_ranks_get_the_one_process_embeddings(evaluated):
    one, ranks = evaluated
    for got in ranks:
        for mine, alone in zip(got["held_out"], one["held_out"]):
            assert mine.shape == alone.shape and (mine.double() - alone.double()).abs().max() < 1e-5
        embeddings, kept, left_out = got["folder"]
        assert kept == one["folder"][1] == list(range(GOOD_FILES)) and left_out == one["folder"][2] == BROKEN_FILES
        assert embeddings.shape == one["folder"][0].shape and (embeddings - one["folder"][0]).abs().max() < 1e-5
        probe_images, probe_captions = got["probe"]
        assert probe_captions == one["probe"][1] and len(probe_captions) == PROBE
        assert (probe_images - one["probe"][0]).abs().max() < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["held_out"], ranks[1]["held_out"]))


def test_both_ranks_get_the_one_process_metrics_and_whole_set_counts(evaluated):
    one, ranks = evaluated
    for got in ranks:
        assert got["held_out_metrics"] == one["held_out_metrics"]
        assert got["zeroshot"] == one["zeroshot"]
        assert got["zeroshot"][1] == {"images": GOOD_FILES, "classes": 10, "templates": 7, "left_out": BROKEN_FILES}
        assert got["karpathy"] == one["karpathy"]
        assert got["karpathy"][1] == {"images": 12, "captions": 25, "left_out": 3}
        assert got["mds"] == one["mds"]
        assert got["mds"][1] == {"images": HELD_OUT - len(BAD_HELD_OUT), "captions": HELD_OUT - len(BAD_HELD_OUT)}
        assert got["small"] == one["small"] and got["small"][1] == {"images": 3, "captions": 3}
    # The comparison can fail: the metrics are not all the same number.
    assert len(set(one["held_out_metrics"].values())) > 1


def test_a_set_with_nothing_usable_is_refused_on_every_rank_alike(evaluated):
    one, ranks = evaluated
    assert ranks[0]["all_bad"] == ranks[1]["all_bad"] == one["all_bad"]
    assert "none of its 3 item(s) is usable (3 bad)" in one["all_bad"]


def test_both_ranks_ran_the_same_forwards_and_stop_checks(evaluated):
    one, ranks = evaluated
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
    assert ranks[0]["asked"] == ranks[1]["asked"] == sum(1 for _ in ranks[0]["forwards"])
    assert all(length <= 256 for _, length in ranks[0]["forwards"])
    # Each rank encoded about half: the folder's 41 files as 21 rows each, not 41.
    images = [length for name, length in ranks[0]["forwards"] if name == "encode_image"]
    assert sum(images) < sum(length for name, length in one["forwards"] if name == "encode_image")

