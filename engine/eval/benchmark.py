"""Standalone zero-shot and retrieval on a loaded run, counted the way CLIP_benchmark counts:
top-1, top-5 and mean per-class recall for zero-shot; R@1/5/10 both ways for retrieval, an
image found when ANY of its captions is (COCO and Flickr30k give five per image).

The embeddings are computed as the in-training evaluation computes them (engine/eval/evaluate.py:
the same batches, the same caption cleaning, the same metric functions), so a run's own held-out
set scores here exactly what its last evaluation logged.

During training (engine/eval/periodic.py) the scoring is split over the ranks (`ranks`,
engine/eval/shard.py): each rank reads, decodes and encodes only its block of the images and
of the texts, and the embeddings are all-gathered; the counts are the whole set's. Alone (this
module's default, launchers/evaluate.py) one process does it all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from engine.errors import UserError
from engine.eval.eval_set import DECODE_BATCH, EvalDecoding, load_eval_set
from engine.eval.evaluate import held_out_embeddings
from engine.eval.images import CaptionedImages, ImageFolder, read_files, read_image_folder, read_karpathy
from engine.eval.load_run import LoadedRun
from engine.eval.shard import ALONE, Ranks, encode_in_step, encode_texts, gather_kept
from engine.eval.zeroshot import class_prompts, classifier_from_prompts, topk_accuracy

KS = (1, 5, 10)


class ModelToScore(Protocol):
    """What scoring needs of a model: a loaded run (engine/eval/load_run.LoadedRun), or the
    model being trained (engine/eval/periodic.py)."""
    model: torch.nn.Module             # encode_image(images), encode_text(tokens): normalised
    tokenizer: Callable[[list[str]], torch.Tensor]
    clean_text: Callable[[str], str] | None
    image_size: int


@dataclass(frozen=True)
class Result:
    task: str                     # "zeroshot" | "retrieval"
    name: str                     # the evaluated set, for the default file name
    data: str                     # the path given
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)   # images, captions, classes, left out
    settings: dict = field(default_factory=dict)   # what the task chose (a probe's regularisation)


def multi_caption_recall(image: torch.Tensor, text: torch.Tensor, image_of_text: torch.Tensor,
                         ks=KS) -> dict[str, float]:
    """R@k both ways on normalised embeddings; caption j belongs to image `image_of_text[j]`.

    image -> text: a hit when the best-ranked of the image's own captions is in the top k;
    text -> image: a hit when the caption's own image is. A rank counts the keys scoring
    strictly higher, as engine/eval/retrieval.py does, so with one caption per image the two
    agree exactly."""
    scores = image @ text.T                                     # [images, captions]
    own = image_of_text[None, :] == torch.arange(len(image))[:, None]
    best_own = scores.masked_fill(~own, float("-inf")).max(1).values
    i2t_rank = (scores > best_own[:, None]).sum(1)
    t2i_scores = scores.T                                       # [captions, images]
    t2i_own = t2i_scores.gather(1, image_of_text[:, None])
    t2i_rank = (t2i_scores > t2i_own).sum(1)
    return {**{f"retrieval_i2t_r{k}": (i2t_rank < k).float().mean().item() for k in ks},
            **{f"retrieval_t2i_r{k}": (t2i_rank < k).float().mean().item() for k in ks}}


def mean_per_class_recall(image: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over classes (those with images) of the share of their images predicted right
    at top-1: CLIP_benchmark's number (scikit-learn's balanced accuracy) for unbalanced sets."""
    predicted = (image @ classifier.T).argmax(1)
    present = labels.unique()
    return torch.stack([(predicted[labels == c] == c).float().mean() for c in present]).mean().item()


def _class_file(spec: str) -> list[str] | dict:
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{spec}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as error:
            raise UserError(f"{spec}: not valid JSON ({error})") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def _listed(spec: str, key: str) -> list[str] | None:
    """A list from FILE: a JSON list, a JSON object's `key` (classes.json), or one per line."""
    content = _class_file(spec)
    if isinstance(content, dict):
        content = content.get(key)
    if content is None:
        return None
    if not (isinstance(content, list) and content and all(isinstance(v, str) for v in content)):
        raise UserError(f"{spec}: give a JSON list of strings, a JSON object with a '{key}' list, or one per line")
    return content


def classnames_for(spec: str | None, folders: list[str]) -> list[str]:
    """None: the folder names; "imagenet": open_clip's ImageNet names; else a FILE, its i-th
    name for the i-th folder in sorted order."""
    if spec is None:
        return list(folders)
    if spec == "imagenet":
        # deferred: importing open_clip takes seconds, which every `--help` and every run
        # without ImageNet's names would otherwise pay (the evaluations are imported to build
        # the flags).
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    else:
        names = _listed(spec, "classnames")
        if names is None:
            raise UserError(f"--classnames {spec}: the JSON object has no 'classnames' list")
    if len(names) != len(folders):
        raise UserError(f"--classnames {spec} lists {len(names)} class(es) but --images has {len(folders)} class "
                        f"folder(s): name one class per folder, in sorted folder order")
    return names


def templates_for(spec: str | None, classnames_spec: str | None) -> list[str]:
    """"openai" (the 80 of CLIP's ImageNet evaluation) or "simple" (open_clip's 7), as open_clip
    ships them; a FILE; None: the class FILE's own templates (classes.json), else "openai"."""
    if spec is None:
        own = None
        if classnames_spec not in (None, "imagenet"):
            content = _class_file(classnames_spec)
            own = content.get("templates") if isinstance(content, dict) else None
        if own is not None:
            spec = classnames_spec
        else:
            spec = "openai"
    if spec in ("openai", "simple"):
        # deferred: see classnames_for
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        # open_clip ships them as functions of the class name; "{}" gives the format string back.
        return [t("{}") for t in (OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)]
    templates = _listed(spec, "templates")
    if templates is None:
        raise UserError(f"--templates {spec}: the JSON object has no 'templates' list")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"--templates {spec}: every template needs a {{}} where the class name goes, e.g. "
                        f"'a photo of a {{}}.'; {bad[0]!r} has none")
    return templates


def _tokens(run: ModelToScore, texts: list[str]) -> torch.Tensor:
    return run.tokenizer([run.clean_text(t) for t in texts] if run.clean_text else texts)


def encode_image_files(run: ModelToScore, files: list[Path], what: str, device,
                       interrupted: Callable[[], bool] | None = None,
                       encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       ranks: Ranks = ALONE) -> tuple[torch.Tensor, list[int], int]:
    """`encode` (default: the normalised image embedding) of `files`, decoded a batch at a time
    (memory bounded by a batch, not the set), the indices of the files kept, and how many were
    left out (bad). Split over `ranks`: each rank reads and decodes its block of `files` only;
    the results are the whole set's, on every rank."""
    block = ranks.block(len(files))
    decoding = EvalDecoding(read_files(files[block.start:block.stop]), run.image_size, what, block.start)
    kept: list[int] = []

    def decoded_images():
        for images, ids in decoding:
            kept.extend(ids)
            yield images

    side = run.image_size
    rows = ranks.padded_rows(len(files))
    encoded = encode_in_step(encode or run.model.encode_image, decoded_images(), rows=rows, window=DECODE_BATCH,
                             filler=lambda: torch.zeros((1, 3, side, side)), device=device, interrupted=interrupted)
    whole = decoding.settle(ranks)   # after the forwards: the ranks' streams end at different points
    (encoded,), ids = gather_kept([encoded], torch.tensor(kept, dtype=torch.long), rows, ranks, device)
    return encoded, ids.tolist(), whole.left_out


@dataclass(frozen=True)
class ZeroShotSet:
    """An ImageFolder with its class names and prompt templates, checked (no image read yet)."""
    path: str
    folder: ImageFolder
    classnames: list[str]
    templates: list[str]

    @classmethod
    def open(cls, images: str, classnames: str | None = None, templates: str | None = None) -> "ZeroShotSet":
        folder = read_image_folder(images)
        return cls(str(images), folder, classnames_for(classnames, folder.folders), templates_for(templates, classnames))


@torch.no_grad()
def score_zeroshot(run: ModelToScore, data: ZeroShotSet, device: torch.device | str = "cpu",
                   interrupted: Callable[[], bool] | None = None, ranks: Ranks = ALONE) -> Result:
    image, kept, left_out = encode_image_files(run, data.folder.files, f"--images {data.path}", device, interrupted,
                                               ranks=ranks)
    labels = torch.tensor([data.folder.labels[i] for i in kept], dtype=torch.long)
    prompts = encode_texts(run.model.encode_text, class_prompts(data.classnames, data.templates),
                           lambda texts: _tokens(run, texts), ranks, device, interrupted)
    classifier = classifier_from_prompts(prompts, len(data.classnames))
    metrics = topk_accuracy(image, classifier, labels)
    metrics["zeroshot_mean_per_class_recall"] = mean_per_class_recall(image, classifier, labels)
    return Result("zeroshot", Path(data.path).resolve().name, data.path, metrics,
                  {"images": len(kept), "classes": len(data.classnames), "templates": len(data.templates),
                   "left_out": left_out})


def zeroshot(run: ModelToScore, images: str, classnames: str | None = None, templates: str | None = None,
             device: torch.device | str = "cpu") -> Result:
    return score_zeroshot(run, ZeroShotSet.open(images, classnames, templates), device)


@dataclass(frozen=True)
class RetrievalSet:
    """Captioned images: a Karpathy-split file (several captions per image, listed here) or an
    MDS directory (one caption per image, read when scored)."""
    path: str
    name: str
    karpathy: CaptionedImages | None

    @classmethod
    def open(cls, pairs: str, split: str = "test", image_root: str | None = None) -> "RetrievalSet":
        path = Path(pairs)
        if path.is_dir():
            if not (path / "index.json").exists():
                raise UserError(f"--pairs {pairs}: a directory must be an MDS dataset (no index.json); "
                                f"convert one with `python launchers/convert.py`")
            return cls(str(pairs), path.resolve().name, None)
        if path.is_file():
            return cls(str(pairs), f"{path.stem}-{split}", read_karpathy(path, split, image_root))
        raise UserError(f"--pairs {pairs}: no such file or directory; give a Karpathy-split .json or an MDS directory")


@torch.no_grad()
def score_retrieval(run: ModelToScore, data: RetrievalSet, device: torch.device | str = "cpu",
                    interrupted: Callable[[], bool] | None = None, ranks: Ranks = ALONE) -> Result:
    if data.karpathy is None:
        held_out = load_eval_set(data.path, run.image_size, ranks)  # one caption per image, bad records left out
        whole = held_out_embeddings(run.model, held_out, lambda texts: _tokens(run, texts), device, interrupted)
        image_embeddings, text_embeddings = whole.image, whole.text
        left_out = None
        image_of_text = torch.arange(len(text_embeddings))
    else:
        image_embeddings, kept, left_out = encode_image_files(run, data.karpathy.files, f"--pairs {data.path}",
                                                              device, interrupted, ranks=ranks)
        kept_captions = [data.karpathy.captions[i] for i in kept]  # an image left out takes its captions
        captions = [c for per_image in kept_captions for c in per_image]
        image_of_text = torch.tensor([i for i, per_image in enumerate(kept_captions) for _ in per_image])
        text_embeddings = encode_texts(run.model.encode_text, captions, lambda texts: _tokens(run, texts), ranks,
                                       device, interrupted)
    counts = {"images": len(image_embeddings), "captions": len(text_embeddings)}
    if left_out is not None:
        counts["left_out"] = left_out
    return Result("retrieval", data.name, data.path,
                  multi_caption_recall(image_embeddings, text_embeddings, image_of_text), counts)


def retrieval(run: ModelToScore, pairs: str, split: str = "test", image_root: str | None = None,
              device: torch.device | str = "cpu") -> Result:
    return score_retrieval(run, RetrievalSet.open(pairs, split, image_root), device)


def default_out(run: LoadedRun, result: Result) -> Path:
    return run.run_dir / "eval" / f"{result.task}-{result.name}.json"


def write_result(run: LoadedRun, result: Result, out: str | Path | None) -> Path:
    path = Path(out) if out else default_out(run, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": result.task, "data": result.data, "metrics": result.metrics, "counts": result.counts,
              "run": run.url or str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
              "method": run.plan["method"], "model": run.plan["model"], **({"settings": result.settings}
                                                                          if result.settings else {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(run: LoadedRun, result: Result) -> str:
    counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in result.counts.items())
    lines = [f"{result.task} on {result.data} ({counts})",
             f"model: {run.plan['method']} {run.plan['model']}, step {run.step} ({run.checkpoint})"]
    if result.settings:
        lines.append("chosen: " + ", ".join(f"{k} {v}" for k, v in result.settings.items()))
    lines.append(f"  {'metric':<34}{'%':>8}")
    lines += [f"  {name:<34}{100 * value:>8.2f}" for name, value in result.metrics.items()]
    return "\n".join(lines)
