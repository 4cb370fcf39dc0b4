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
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402

# Which options belong to which task: one given to the other task is refused, not ignored.
TASK_OPTIONS = {"zeroshot": ("images", "classnames", "templates"),
                "retrieval": ("pairs", "split", "image_root"),
                "linear-probe": ("train", "test"),
                "voc07-svm": ("train", "test", "train_split", "test_split")}
REQUIRED = {"zeroshot": ("images",), "retrieval": ("pairs",), "linear-probe": ("train", "test"),
            "voc07-svm": ("train", "test")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest intact checkpoint) or <run>/checkpoints/stepNNNNNNNN")
    p.add_argument("--task", required=True, choices=sorted(TASK_OPTIONS))
    p.add_argument("--images", help="zeroshot: ImageFolder directory, DIR/<class>/<image>")
    p.add_argument("--classnames", help="zeroshot: 'imagenet' (open_clip's names), or a FILE: one name per line, "
                   "a JSON list, or a classes.json with 'classnames' (default: the folder names)")
    p.add_argument("--templates", help="zeroshot: 'openai' (CLIP's 80), 'simple' (open_clip's 7), or a FILE "
                   "like --classnames, each with {} for the class name (default: the --classnames file's "
                   "'templates', else openai)")
    p.add_argument("--pairs", help="retrieval: a Karpathy-split .json or an MDS directory")
    p.add_argument("--split", help="retrieval: the Karpathy split to use (default: test)")
    p.add_argument("--image-root", help="retrieval: the folder a Karpathy file's image paths start from "
                   "(default: the file's folder)")
    p.add_argument("--train", help="linear-probe: ImageFolder directory; voc07-svm: VOCdevkit year folder or a "
                   "folder with labels.json (the classifiers are fit on it)")
    p.add_argument("--test", help="linear-probe, voc07-svm: the set scored, laid out as --train")
    p.add_argument("--train-split", help="voc07-svm on a VOCdevkit folder: ImageSets/Main split of --train "
                   "(default: trainval)")
    p.add_argument("--test-split", help="voc07-svm on a VOCdevkit folder: ImageSets/Main split of --test "
                   "(default: test)")
    p.add_argument("--out", help="JSON file to write (default: RUN/eval/<task>-<set>.json)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when there is one)")
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    for required in REQUIRED[args.task]:
        if getattr(args, required) is None:
            raise UserError(f"--task {args.task} needs --{required.replace('_', '-')}")
    for options in TASK_OPTIONS.values():
        for option in options:
            if option not in TASK_OPTIONS[args.task] and getattr(args, option) is not None:
                owners = " or ".join(t for t, o in TASK_OPTIONS.items() if option in o)
                raise UserError(f"--{option.replace('_', '-')} belongs to --task {owners}, not --task {args.task}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
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
        if args.task == "zeroshot":
            result = benchmark.zeroshot(run, args.images, args.classnames, args.templates, device)
        elif args.task == "retrieval":
            result = benchmark.retrieval(run, args.pairs, args.split or "test", args.image_root, device)
        elif args.task == "linear-probe":
            from engine.eval.linear_probe import linear_probe
            result = linear_probe(run, args.train, args.test, device)
        else:
            from engine.eval.voc07 import voc07_svm
            result = voc07_svm(run, args.train, args.test, args.train_split, args.test_split, device)
        path = benchmark.write_result(run, result, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(benchmark.table(run, result))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
