"""Export a trained run (its newest intact checkpoint) or one checkpoint for open_clip or
Hugging Face transformers; the export is loaded back and checked before OUT is written.

  python launchers/export.py runs/<run> --format hf OUT
  python launchers/export.py runs/<run> --format open_clip OUT
  python launchers/export.py runs/<run>/checkpoints/step00001000 --format safetensors OUT

hf:          transformers.CLIPModel.from_pretrained(OUT) and CLIPProcessor.from_pretrained(OUT)
             (config.json, model.safetensors, tokenizer and image-processor files)
open_clip:   open_clip.create_model_and_transforms("local-dir:OUT"), open_clip.get_tokenizer("local-dir:OUT")
safetensors: any model, in clipzero's names: engine.export.plain.load_exported(OUT)
hf and open_clip hold CLIP's native towers: presets vit-debug, vit-b-32, vit-b-16, vit-l-14 and
vit-h-14 trained with --method clip or declip. Every export carries model_card.json (architecture, method,
recipe numbers, data, steps, the run's evaluation results).

Before OUT appears, the export is loaded through its own library and must embed a fixed batch
of images and captions within 1e-5 of the run's model (max abs difference of normalised
embeddings); otherwise nothing is written, the difference is printed and the exit status is 1.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402

FORMATS = ("hf", "open_clip", "safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest intact checkpoint) or <run>/checkpoints/stepNNNNNNNN")
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or empty; see --force)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds something (only once verified)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from engine.export.publish import ExportNotVerified, check_out, export

        check_out(Path(args.out), args.force)   # before the minutes a large run takes to load
        from engine.eval.load_run import load_run
        from engine.export.card import run_card

        run = load_run(args.run, "cpu")
        try:
            result = export(run.model, run.preset, args.fmt, args.out, run_card(run), force=args.force)
        except ExportNotVerified as failure:
            print(f"error: {failure}\nnothing was written to {args.out}", file=sys.stderr)
            return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {run.plan['method']} {run.plan['model']}, step {run.step} ({run.checkpoint}), as {args.fmt}")
    print(f"  {result.out}: {', '.join(result.files)}")
    print(f"  verified against {result.agreement.describe()}")
    print("load it with:")
    print("\n".join(f"  {line}" for line in result.how_to_load.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
