"""Standalone zero-shot and retrieval on a loaded run, counted the way CLIP_benchmark counts:
top-1, top-5 and mean per-class recall for zero-shot; R@1/5/10 both ways for retrieval, an
image found when ANY of its captions is (COCO and Flickr30k give five per image).

The embeddings are computed as the in-training evaluation computes them (engine/eval/evaluate.py:
the same batches, the same caption cleaning, the same metric functions), so a run's own held-out
set scores here exactly what its last evaluation logged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import UserError
from engine.eval.evaluate import encode_batched
from engine.eval.images import decode_images, read_image_folder, read_karpathy
from engine.eval.load_run import LoadedRun
from engine.eval.zeroshot import class_prompts, classifier_from_prompts, topk_accuracy

KS = (1, 5, 10)


@dataclass(frozen=True)
class Result:
    task: str                     # "zeroshot" | "retrieval"
    name: str                     # the evaluated set, for the default file name
    data: str                     # the path given
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)   # images, captions, classes, left out


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


def _tokens(run: LoadedRun, texts: list[str]) -> torch.Tensor:
    return run.tokenizer([run.clean_text(t) for t in texts] if run.clean_text else texts)


@torch.no_grad()
def zeroshot(run: LoadedRun, images: str, classnames: str | None = None, templates: str | None = None,
             device: torch.device | str = "cpu") -> Result:
    folder = read_image_folder(images)
    names = classnames_for(classnames, folder.folders)
    prompts_templates = templates_for(templates, classnames)
    decoded = decode_images(folder.files, run.image_size, f"--images {images}")
    labels = torch.tensor([folder.labels[i] for i in decoded.kept], dtype=torch.long)
    image = encode_batched(run.model.encode_image, decoded.images, device, None)
    prompts = encode_batched(run.model.encode_text, _tokens(run, class_prompts(names, prompts_templates)), device, None)
    classifier = classifier_from_prompts(prompts, len(names))
    metrics = topk_accuracy(image, classifier, labels)
    metrics["zeroshot_mean_per_class_recall"] = mean_per_class_recall(image, classifier, labels)
    return Result("zeroshot", Path(images).resolve().name, str(images), metrics,
                  {"images": len(decoded.kept), "classes": len(names), "templates": len(prompts_templates),
                   "left_out": len(decoded.left_out)})


@torch.no_grad()
def retrieval(run: LoadedRun, pairs: str, split: str = "test", image_root: str | None = None,
              device: torch.device | str = "cpu") -> Result:
    path = Path(pairs)
    if path.is_dir():
        if not (path / "index.json").exists():
            raise UserError(f"--pairs {pairs}: a directory must be an MDS dataset (no index.json); "
                            f"convert one with `python launchers/convert.py`")
        from engine.data.eval_set import load_eval_set
        held_out = load_eval_set(path, run.image_size)  # one caption per image, bad records left out
        images, captions = held_out.images, held_out.captions
        image_of_text = torch.arange(len(captions))
        name, left_out = path.resolve().name, None
    elif path.is_file():
        listed = read_karpathy(path, split, image_root)
        decoded = decode_images(listed.files, run.image_size, f"--pairs {pairs}")
        images = decoded.images
        kept_captions = [listed.captions[i] for i in decoded.kept]  # an image left out takes its captions
        captions = [c for per_image in kept_captions for c in per_image]
        image_of_text = torch.tensor([i for i, per_image in enumerate(kept_captions) for _ in per_image])
        name, left_out = f"{path.stem}-{split}", len(decoded.left_out)
    else:
        raise UserError(f"--pairs {pairs}: no such file or directory; give a Karpathy-split .json or an MDS directory")
    image_embeddings = encode_batched(run.model.encode_image, images, device, None)
    text_embeddings = encode_batched(run.model.encode_text, _tokens(run, captions), device, None)
    counts = {"images": len(images), "captions": len(captions)}
    if left_out is not None:
        counts["left_out"] = left_out
    return Result("retrieval", name, str(pairs), multi_caption_recall(image_embeddings, text_embeddings,
                                                                      image_of_text), counts)


def default_out(run: LoadedRun, result: Result) -> Path:
    return run.run_dir / "eval" / f"{result.task}-{result.name}.json"


def write_result(run: LoadedRun, result: Result, out: str | Path | None) -> Path:
    path = Path(out) if out else default_out(run, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": result.task, "data": result.data, "metrics": result.metrics, "counts": result.counts,
              "run": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
              "method": run.plan["method"], "model": run.plan["model"]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(run: LoadedRun, result: Result) -> str:
    counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in result.counts.items())
    lines = [f"{result.task} on {result.data} ({counts})",
             f"model: {run.plan['method']} {run.plan['model']}, step {run.step} ({run.checkpoint})",
             f"  {'metric':<34}{'%':>8}"]
    lines += [f"  {name:<34}{100 * value:>8.2f}" for name, value in result.metrics.items()]
    return "\n".join(lines)
