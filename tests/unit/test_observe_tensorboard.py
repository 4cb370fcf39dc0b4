"""TensorBoard: scalars under a few sections (engine/observe/metrics.tensorboard_tag), and text,
images and histograms written by MetricsWriter and the charts hooks, read back as TensorBoard
reads them and from metrics.jsonl, and dropped after the checkpoint step by a resumed run."""
import json
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.data.mlm import IGNORE_INDEX, MASK_ID
from engine.data.text import ClipTokenizer
from engine.plan.hardware import Hardware
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.observe.charts import Charts, HeldOutProbe
from engine.observe.metrics import SECTIONS, MetricsWriter, tensorboard_tag
from engine.observe.visuals import CELL, GAP, heatmap
from engine.plan.dials import Dials
from engine.plan.optimizer import OptimizerSupport
from engine.plan.resolve import resolve


def _events(run_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(run_dir / "tensorboard"),
                                 size_guidance={ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0, ea.SCALARS: 0})
    events.Reload()
    return events


def _records(run_dir, kind=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("kind") == kind]


def _text(events, tag):
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


def _png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(encoded)).convert("RGB"))


def _h100_plan():
    hardware = Hardware("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0), True, world_size=8,
                        local_world_size=8, nodes=1, cpus_per_node=64)
    return resolve(Dials(model="vit-b-32"), hardware, lookup("clip", "vit-b-32"), n_params=151_000_000,
                   dataset_size=15_000_000, optimizer_support=OptimizerSupport(True, True, True), image_size=224)


def test_text_image_and_histogram_reach_tensorboard_and_the_jsonl(tmp_path):
    table = _h100_plan().table()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    values = np.array([3.0, -1.5, 7.25, 0.5])
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.text(0, "plan", table)
    writer.write(1, {"loss": 2.0})
    writer.image(1, "train/views", pixels, notes="**row 1**", samples=[{"caption": "a dog"}])
    writer.histogram(1, "logit_scale", values)
    writer.close()

    events = _events(tmp_path)
    [plan] = _text(events, "plan")
    assert "precision" in plan and "| bf16" in plan  # the table's rows, kept as rows (indented: preformatted)
    [image] = events.Images("train/views")
    assert (image.step, image.width, image.height) == (1, 30, 20)
    assert np.array_equal(_png(image.encoded_image_string), pixels)
    assert _text(events, "train/views") == ["**row 1**"]
    [histogram] = events.Histograms("train/logit_scale")  # beside its scalar
    value = histogram.histogram_value
    assert (histogram.step, value.num, value.min, value.max, value.sum) == (1, 4, -1.5, 7.25, 9.25)
    assert [e.value for e in events.Scalars("train/loss")] == [2.0]

    [text] = _records(tmp_path, "text")
    assert text == {"step": 0, "kind": "text", "tag": "plan", "text": table}
    [record] = _records(tmp_path, "image")
    assert record["path"] == "visuals/train-views-step00000001.png" and record["samples"] == [{"caption": "a dog"}]
    assert np.array_equal(np.asarray(Image.open(tmp_path / record["path"])), pixels)
    [summary] = _records(tmp_path, "histogram")
    assert summary["tag"] == "logit_scale"  # metrics.jsonl keeps the names
    assert (summary["count"], summary["min"], summary["max"], summary["mean"]) == (4, -1.5, 7.25, 2.3125)
    assert summary["quantiles"]["0.5"] == pytest.approx(np.median(values))
    assert _records(tmp_path) == [{"step": 1, "loss": 2.0}]  # scalar lines as before: no "kind"


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> CLIP-normalised [N, 3, S, S], as the loader yields images."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _declip_batch(tokenizer, count=3, size=32):
    rng = np.random.default_rng(1)
    views = [rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8) for _ in range(2)]
    captions = ["a red bird on a branch", "two dogs play", "the digit 7"]
    text = tokenizer(captions)
    labels = torch.full_like(text, IGNORE_INDEX)
    labels[:, 2], text[:, 2] = text[:, 2], MASK_ID  # the second word of each caption masked
    batch = {"image": _normalised(views[0]), "image2": _normalised(views[1]), "text": text,
             "mlm_labels": labels, "text_aug": tokenizer(["bird a red on a branch", "two dogs", "digit 7"]),
             "sample_id": torch.tensor([5, 6, 7])}
    return batch, views, captions


def test_the_first_batchs_views_are_drawn_side_by_side_with_their_text_views(tmp_path):
    tokenizer = ClipTokenizer(16)
    batch, views, captions = _declip_batch(tokenizer)
    writer = MetricsWriter(tmp_path, enabled=True)
    charts = Charts(writer)
    second = {**batch, "sample_id": torch.tensor([8, 9, 10])}
    assert list(charts.batches(iter([batch, second]), first_step=1)) == [batch, second]  # passed on as they were
    writer.close()

    [image] = _events(tmp_path).Images("train/views")  # the first batch only
    picture = _png(image.encoded_image_string)
    assert picture.shape == (3 * CELL + 4 * GAP, 2 * CELL + 3 * GAP, 3)
    scale = CELL // 32
    for column, view in enumerate(views):  # normalisation undone, tiles enlarged pixel for pixel
        left = GAP + column * (CELL + GAP)
        tile = picture[GAP:GAP + CELL, left:left + CELL]
        assert np.array_equal(tile, view[0].repeat(scale, axis=0).repeat(scale, axis=1))
    [record] = _records(tmp_path, "image")
    assert record["columns"] == ["image", "image2"]
    assert [s["sample_id"] for s in record["samples"]] == [5, 6, 7]
    assert [s["caption"] for s in record["samples"]] == captions
    assert [s["mlm_input"] for s in record["samples"]] == ["a [mask] bird on a branch", "two [mask] play",
                                                           "the [mask] 7"]
    assert record["samples"][0]["text_aug"] == "bird a red on a branch"
    notes = _text(_events(tmp_path), "train/views")[0]
    assert "MLM input: two [mask] play" in notes and "EDA copy: digit 7" in notes


def test_evaluation_draws_the_similarity_heatmap_and_the_norms_of_a_fixed_batch(tmp_path):
    preset = lookup("clip", "debug").preset
    tokenizer = ClipTokenizer(preset.context_length)
    torch.manual_seed(0)
    model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    images = torch.randn(6, 3, preset.image_size, preset.image_size)
    captions = [f"Digit {i}." for i in range(6)]
    probe = HeldOutProbe.first(images, captions, tokenizer, clean_text=str.lower, count=5)
    writer = MetricsWriter(tmp_path, enabled=True)
    Charts(writer, model=model, probe=probe, device=torch.device("cpu")).evaluated(4, {})
    writer.close()
    assert model.training  # as it was before the evaluation

    model.eval()
    with torch.no_grad():
        image = model.encode_image(images[:5], normalize=False)
        text = model.encode_text(tokenizer([c.lower() for c in captions[:5]]), normalize=False)
    cosine = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).numpy()
    [record] = _records(tmp_path, "image")
    assert record["tag"] == "heldout/similarity" and record["captions"] == ["digit 0.", "digit 1.", "digit 2.",
                                                                             "digit 3.", "digit 4."]
    assert np.allclose(record["matrix"], cosine, atol=1e-4)
    events = _events(tmp_path)
    [picture] = events.Images("eval/heldout/similarity")
    assert np.array_equal(_png(picture.encoded_image_string), heatmap(cosine))
    assert "diagonal holds the true pairs" in _text(events, "eval/heldout/similarity")[0]
    norms = {"eval/heldout/image_embedding_norm": image.norm(dim=-1),
             "eval/heldout/text_embedding_norm": text.norm(dim=-1)}
    for tag, expected in norms.items():
        [histogram] = events.Histograms(tag)
        value = histogram.histogram_value
        assert (histogram.step, value.num) == (4, 5)
        assert (value.min, value.max) == pytest.approx((expected.min().item(), expected.max().item()), rel=1e-5)


def test_the_heatmap_runs_dark_to_bright_from_the_smallest_to_the_largest_value():
    picture = heatmap(np.array([[0.2, -0.4], [0.9, 0.2]]), cell=3)
    assert picture.shape == (6, 6, 3)
    assert tuple(picture[0, 3]) == (68, 1, 84) and tuple(picture[3, 0]) == (253, 231, 37)  # viridis' ends


def test_the_logit_scale_histogram_holds_the_steps_since_the_last_log(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    charts = Charts(writer)
    for step, value in enumerate((10.0, 12.0, 11.0), start=1):
        charts.step_done(step, {"loss": torch.tensor(1.0), "logit_scale": torch.tensor(value)}, skipped=False)
    charts.logged(3, {})
    charts.step_done(4, {"logit_scale": torch.tensor(13.0)}, skipped=False)
    charts.step_done(5, {"logit_scale": torch.tensor(float("nan"))}, skipped=True)  # not trained: left out
    charts.logged(5, {})
    writer.close()
    assert [(r["step"], r["count"], r["min"], r["max"]) for r in _records(tmp_path, "histogram")] == [
        (3, 3, 10.0, 12.0), (5, 1, 13.0, 13.0)]


def test_other_ranks_draw_and_write_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    charts = Charts(writer)
    tokenizer = ClipTokenizer(16)
    batch, _, _ = _declip_batch(tokenizer)
    assert list(charts.batches(iter([batch]), first_step=1)) == [batch]
    charts.step_done(1, {"logit_scale": torch.tensor(1.0)}, skipped=False)
    charts.logged(1, {})
    writer.histogram(1, "x", [1.0])
    assert not any(tmp_path.iterdir())


def test_a_resumed_run_drops_every_kind_of_record_after_its_checkpoint(tmp_path):
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    writer = MetricsWriter(tmp_path, enabled=True, resume_step=0)  # a fresh run starts at step 0
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)})
        writer.histogram(step, "logit_scale", [float(step)])
        writer.image(step, "heldout/similarity", pixels)
    writer.text(4, "plan", "first")
    writer.close()

    writer = MetricsWriter(tmp_path, enabled=True, resume_step=2)  # resumed from step 2's checkpoint
    writer.text(2, "plan", "resumed")
    writer.histogram(3, "logit_scale", [30.0])
    writer.image(3, "heldout/similarity", pixels + 1)
    writer.close()

    steps = [(row["step"], row.get("kind")) for row in
             map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert max(step for step, _ in steps[:-3]) == 2 and steps[-3:] == [(2, "text"), (3, "histogram"), (3, "image")]
    assert sorted(p.name for p in (tmp_path / "visuals").iterdir()) == [
        f"heldout-similarity-step0000000{step}.png" for step in (1, 2, 3)]
    assert np.asarray(Image.open(tmp_path / "visuals" / "heldout-similarity-step00000003.png")).max() == 1
    # What TensorBoard's dashboards read (its plugin accumulator: every summary as a tensor), which
    # takes a run's second session start, not its first, as a restart.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    served = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    served.Reload()
    steps = {tag: [e.step for e in served.Tensors(tag)] for tag in served.Tags()["tensors"]}
    assert steps == {"train/loss": [1, 2], "train/logit_scale": [1, 2, 3], "eval/heldout/similarity": [1, 2, 3],
                     "plan/text_summary": [2]}
    assert served.Tensors("plan/text_summary")[0].tensor_proto.string_val[0].decode() == "    resumed"


# Every scalar name the engine writes, and its TensorBoard tag. The first block is what
# `deepspeed launchers/pretrain.py --steps 30` (CLIP, one CPU rank) logged; the rest are the
# names other methods, devices, bad data and --eval sets add.
TAGS = {
    "loss": "train/loss", "loss/clip": "train/loss/clip", "lr": "train/lr",
    "logit_scale": "train/logit_scale", "skipped_steps": "train/skipped_steps",
    "samples_per_s": "perf/samples_per_s", "tflops_per_s": "perf/tflops_per_s",
    "time/step_s": "perf/step_s", "time/data_wait_s": "perf/data_wait_s",
    "memory/max_rss_gb": "memory/max_rss_gb",
    **{f"retrieval_{way}_r{k}": f"eval/heldout/retrieval_{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)},
    "zeroshot_top1": "eval/heldout/zeroshot_top1", "zeroshot_top5": "eval/heldout/zeroshot_top5",

    **{f"loss/{term}": f"train/loss/{term}" for term in ("siglip", "jsd", "prior", "simsiam", "mlm", "nn")},
    "mfu": "perf/mfu", "memory/max_allocated_gb": "memory/max_allocated_gb",
    "data/bad_records": "data/bad_records",
    **{f"data/bad_records/{name}": f"data/bad_records/{name}" for name in (
        "empty_image", "undecodable_image", "truncated_or_corrupt_image", "unsupported_image_format",
        "image_under_8_px", "empty_caption", "caption_over_4_000_characters", "rejected_by_the_image_decoder",
        "no_usable_stand_in")},
    **{f"eval/val/zeroshot_{m}": f"eval/val/zeroshot_{m}" for m in ("top1", "top5", "mean_per_class_recall")},
    "eval/coco-test/retrieval_i2t_r1": "eval/coco-test/retrieval_i2t_r1",
    # charts' tags (histograms and images) go through the same mapping
    "heldout/similarity": "eval/heldout/similarity", "heldout/image_embedding_norm": "eval/heldout/image_embedding_norm",
    "train/views": "train/views",
}


def _names_the_engine_makes() -> set[str]:
    """The names as the engine's own code builds them, so that a new one needs a row in TAGS."""
    from engine.data.records import REASONS
    from engine.eval.retrieval import retrieval_metrics
    from engine.eval.zeroshot import topk_accuracy
    from engine.observe.bad_records import BadRecordTally
    from engine.observe.throughput import StepTimer, memory_gb

    embeddings = torch.eye(12)
    return {*StepTimer().read_and_reset(), *memory_gb(),
            *BadRecordTally(Counter(), torch.device("cpu"), {reason: 1 for reason in REASONS}).metrics(),
            *retrieval_metrics(embeddings, embeddings), *topk_accuracy(embeddings, embeddings, torch.arange(12))}


def test_every_name_the_engine_writes_has_one_tag_under_a_section():
    assert _names_the_engine_makes() <= set(TAGS)
    assert {name: tensorboard_tag(name) for name in TAGS} == TAGS
    assert len(set(TAGS.values())) == len(TAGS)  # no two names share a chart
    for tag in TAGS.values():
        assert tag.split("/")[0] in SECTIONS and tag.count("/") >= 1 and tensorboard_tag(tag) == tag, tag
    # Total: a name nobody listed (a plugin objective's term, a new counter) still gets a section.
    assert [tensorboard_tag(n) for n in ("my_term", "loss/my_term", "", "time", "eval", "heldout")] == [
        "train/my_term", "train/loss/my_term", "train/", "train/time", "train/eval", "train/heldout"]


def test_a_resume_purges_later_steps_of_old_flat_tags_and_of_sectioned_ones(tmp_path):
    """A run whose first launch logged the flat names of before (as the old MetricsWriter did:
    the same events, tags unmapped), resumed twice: every later step goes from every tag."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    from torch.utils.tensorboard import SummaryWriter

    old = SummaryWriter(log_dir=str(tmp_path / "tensorboard"), purge_step=1)
    with open(tmp_path / "metrics.jsonl", "w") as jsonl:
        for step in range(1, 5):
            values = {"loss": float(step), "zeroshot_top1": step / 10, "memory/max_rss_gb": 1.0}
            for name, value in values.items():
                old.add_scalar(name, value, step)
            jsonl.write(json.dumps({"step": step, **values}) + "\n")
    old.close()

    for resume_step, steps, scale in ((2, (3, 4, 5), 1.0), (4, (5,), 10.0)):
        writer = MetricsWriter(tmp_path, enabled=True, resume_step=resume_step)
        for step in steps:
            writer.write(step, {"loss": step * scale, "zeroshot_top1": step * scale / 10, "memory/max_rss_gb": 2.0})
        writer.close()

    expected = {"loss": [(1, 1.0), (2, 2.0)], "zeroshot_top1": [(1, 0.1), (2, 0.2)],
                "memory/max_rss_gb": [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)],  # its name is its tag
                "train/loss": [(3, 3.0), (4, 4.0), (5, 50.0)],
                "eval/heldout/zeroshot_top1": [(3, 0.3), (4, 0.4), (5, 5.0)]}
    served = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    served.Reload()  # what the dashboards read
    assert {tag: [(e.step, pytest.approx(make_ndarray(e.tensor_proto).item())) for e in served.Tensors(tag)]
            for tag in served.Tags()["tensors"]} == expected
    legacy = ea.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={ea.SCALARS: 0})
    legacy.Reload()  # what tests/integration/launching.tensorboard_scalars reads
    new_tags = set(legacy.Tags()["scalars"]) - {"loss", "zeroshot_top1"}
    assert all(tag.split("/")[0] in SECTIONS for tag in new_tags)
    assert {tag: [(e.step, pytest.approx(e.value)) for e in legacy.Scalars(tag)]
            for tag in legacy.Tags()["scalars"]} == expected
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
