"""Evaluate a trained run (its newest intact checkpoint) or one checkpoint, on one process.

  python launchers/evaluate.py runs/<run> --task zeroshot --images imagenet/val --classnames imagenet
  python launchers/evaluate.py runs/<run> --task zeroshot --images my_classes/ --templates simple
  python launchers/evaluate.py runs/<run> --task retrieval --pairs coco/dataset_coco.json --image-root coco/
  python launchers/evaluate.py runs/<run>/checkpoints/step00001000 --task retrieval --pairs /data/mds/heldout
  python launchers/evaluate.py runs/<run> --task linear-probe --train imagenet/train --test imagenet/val
  python launchers/evaluate.py runs/<run> --task voc07-svm --train VOCdevkit/VOC2007 --test VOCdevkit/VOC2007

zeroshot: an ImageFolder layout (DIR/<class>/<image>); classes numbered in sorted folder order.
  Reports top-1, top-5 and mean per-class recall.
retrieval: a Karpathy-split JSON (COCO, Flickr30k: several captions per image; --split test by
  default) or an MDS directory (one caption per image). Reports R@1/5/10 image->text (found when
  any of the image's captions is) and text->image.
linear-probe: two ImageFolder layouts with the same class folders. A logistic regression on the
  image tower's frozen features (before its projection to the shared embedding), its L2 strength
  chosen on 20% of --train held out (seeded), refit on all of --train: CLIP's protocol. Reports
  top-1 and mean per-class recall on --test, and the chosen C.
voc07-svm: one linear SVM per class on the same features, L2-normalised, its cost chosen by
  3-fold cross-validation on --train: the VOC07 protocol CLIP-Lite reports (Goyal et al. 2019).
  Reports mAP on --test (scikit-learn's non-interpolated AP, as CLIP-Lite; also Goyal's
  interpolated one) and each class's AP. Each DIR is either
    a VOCdevkit year folder (VOCdevkit/VOC2007: JPEGImages/<id>.jpg and ImageSets/Main/
    <class>_<split>.txt, one '<id> 1|-1|0' line per image: present, absent, difficult), the
    split given by --train-split (default trainval) and --test-split (default test): difficult
    images are negatives in training and left out of the test AP; or
    a folder with labels.json: {"<image file, relative to DIR>": ["<class>", ...], ...}, an
    image with [] a negative of every class; the classes are those --train names.
Results are printed as a table and written as JSON (default: RUN/eval/<task>-<set>.json).

Each task is one file declaring its options (engine/eval/tasks/, engine/eval/base.py); your own
evaluation runs as --task package.module:Class, its options then listed by --help.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402
from engine.eval.registry import evaluation_class, evaluations  # noqa: E402

LAUNCHER_OWN = ("run", "task", "out", "device")   # no evaluation's option may take these names


def task_in(argv) -> str | None:
    """--task alone, read before the full parser is built (a plug-in's options join it)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--task")
    return early.parse_known_args(argv)[0].task


def declared_options(task: str | None) -> dict:
    """name -> (EvalOption, [tasks declaring it]) over every standalone evaluation and `task`."""
    declared: dict = {}
    for name, cls in evaluations("standalone", extra=task).items():
        for option in cls.options:
            declared.setdefault(option.name, (option, []))[1].append(name)
    return declared


def _help(owners_of: dict, name: str) -> str:
    """Each task's help for option `name`, tasks with the same text together: 'a, b: text; c: other'."""
    by_text: dict[str, list[str]] = {}
    for task, cls in owners_of.items():
        for option in cls.options:
            if option.name == name:
                by_text.setdefault(option.help, []).append(task)
    return "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in by_text.items())


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    task = task_in(argv)
    standalone = evaluations("standalone", extra=task)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest intact checkpoint) or <run>/checkpoints/stepNNNNNNNN")
    own = [task] if task and task not in standalone and ":" in task else []   # refused, with its reason, later
    p.add_argument("--task", required=True, choices=[*sorted(standalone), *own],
                   help="the evaluation, or your own as package.module:Class (its options then join this list)")
    seen = set()
    for name, cls in standalone.items():
        for option in cls.options:
            if option.name in LAUNCHER_OWN:
                p.error(f"--task {name} declares an option {option.name!r}, which launchers/evaluate.py takes "
                        f"itself: rename it")
            if option.name not in seen:
                seen.add(option.name)
                p.add_argument("--" + option.name.replace("_", "-"), dest=option.name, metavar=option.metavar,
                               help=_help(standalone, option.name))
    p.add_argument("--out", help="JSON file to write (default: RUN/eval/<task>-<set>.json)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when there is one)")
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The options of --task as given (by name); a required one missing, or one of another task
    given, is refused, not ignored."""
    cls = evaluation_class(args.task)
    if not cls.standalone:
        raise UserError(f"--task {args.task} runs during training only (--eval {args.task}:PATH)")
    for option in cls.options:
        if option.required and getattr(args, option.name) is None:
            raise UserError(f"--task {args.task} needs --{option.name.replace('_', '-')}")
    own = {option.name for option in cls.options}
    for name, (_, owners) in declared_options(args.task).items():
        if name not in own and getattr(args, name, None) is not None:
            raise UserError(f"--{name.replace('_', '-')} belongs to --task {' or '.join(owners)}, "
                            f"not --task {args.task}")
    return {name: getattr(args, name) for name in own}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        given = check_options(args)
        import torch

        from engine.eval import benchmark
        from engine.eval.load_run import load_run

        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as error:
            raise UserError(f"--device {args.device}: give cpu, cuda or cuda:N ({error})") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
        run = load_run(args.run, device)
        result = evaluation_class(args.task).open(given).score(run, device)
        path = benchmark.write_result(run, result, args.out)
        if run.url is not None and args.out is None:  # beside the run, in the store
            from engine.store import ObjectStore, join

            relative = path.relative_to(run.run_dir).as_posix()
            ObjectStore(run.url, run.run_dir).put(relative)
            path = join(run.url, relative)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(benchmark.table(run, result))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
