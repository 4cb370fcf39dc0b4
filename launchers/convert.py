"""Convert image-caption pairs into an MDS dataset for `launchers/pretrain.py --data`.

  python launchers/convert.py my_pairs/ /data/mds/my_pairs           # a.jpg + a.txt, recursively
  python launchers/convert.py pairs.csv /data/mds/pairs --image-column file --caption-column alt
  python launchers/convert.py laion_shards/ /data/mds/laion --workers 16   # img2dataset *.tar
  python launchers/convert.py val.jsonl /data/mds/val --classes classes.json

Sources: a folder of images with same-stem .txt captions; a .csv, .tsv or .jsonl file of image
paths (relative to the file's folder, or absolute) and captions; img2dataset webdataset .tar
shards. Images are stored as their original bytes after a full decode check; bad pairs are
skipped and counted.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder, .csv/.tsv/.jsonl file, .tar shard, or folder of .tar shards")
    p.add_argument("out", help="MDS directory to create")
    p.add_argument("--workers", type=int, help="processes reading and checking images (default: min(8, CPUs))")
    p.add_argument("--shard-size-mb", type=int, default=64, help="shard size limit in MiB (default: 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--image-column", help="CSV/TSV/JSONL column holding the image path "
                   "(default: the first of image, filepath, path, jpg, image_path, file_name, filename)")
    p.add_argument("--caption-column", help="CSV/TSV/JSONL column holding the caption "
                   "(default: the first of caption, text, txt, title)")
    p.add_argument("--classes", help='zero-shot class file to copy into the dataset: '
                   '{"classnames": [...], "templates": [...]}')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.data.convert import convert

    try:
        report = convert(args.source, args.out, workers=args.workers, shard_size_mb=args.shard_size_mb,
                         overwrite=args.overwrite, image_column=args.image_column,
                         caption_column=args.caption_column, classes=args.classes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
