"""Convert image-caption pairs into an MDS dataset for `launchers/pretrain.py --data`.

  python launchers/convert.py my_pairs/ /data/mds/my_pairs           # a.jpg + a.txt, recursively
  python launchers/convert.py pairs.csv /data/mds/pairs --image-column file --caption-column alt
  python launchers/convert.py laion_shards/ /data/mds/laion --workers 16   # img2dataset *.tar or *.parquet
  python launchers/convert.py hf_parquet/ /data/mds/hf --max-side 512 --compression zstd
  python launchers/convert.py coco/dataset_coco.json /data/mds/coco-test --split test --image-root coco/
  python launchers/convert.py val.csv /data/mds/val --label-column class     # cls column + classes.json
  python launchers/convert.py --synthetic 20000 /data/mds/shapes --workers 4  # coloured shapes, labelled
  python launchers/convert.py laion_shards/ /data/mds/laion --part 3/8  # part 3 of 8, on any machine,
  python launchers/convert.py --merge /data/mds/laion                   # then publish the 8 parts as one
  sbatch --array 0-7 launchers/slurm/convert.sbatch laion_shards/ /data/mds/laion   # the same on SLURM
  python launchers/convert.py s3://bucket/laion s3://bucket/mds/laion --workers 16   # object store
  sbatch --array 0-31 launchers/slurm/convert.sbatch s3://bucket/laion s3://bucket/mds/laion

Sources: a folder of images with same-stem .txt captions; a .csv, .tsv or .jsonl file of image
paths (relative to the file's folder or --image-root, or absolute) and captions; img2dataset
output (webdataset .tar shards, or its parquet with image bytes); parquet files with image bytes
(binary or Hugging Face {bytes, path} structs) or paths; a Karpathy-split JSON (COCO, Flickr30k).
Images are stored as their original bytes after a full decode check (re-encoded only when
--max-side asks); bad pairs are skipped and counted. An interrupted conversion resumes when the
same command is run again. The summary is also written to OUT/convert_report.json.

Split over machines: part I of N converts every N-th block of 1,024 listed pairs (those whose
number mod N is I) into its own folder beside OUT (all parts need the source and OUT's parent
folder at the same paths, e.g. on a shared file system); a rerun of a part converts only what it
lacks. --merge checks that all N parts are done with the same options and publishes OUT: the same
samples, in the same order, in the same shards as one conversion of the whole source.

Object store (engine/data/convert/remote.py): SOURCE s3://bucket/prefix of webdataset .tar files
(directly under it) or parquet files with image bytes (below it), or a local folder of them, to
OUT s3://bucket/prefix (S3_ENDPOINT_URL and AWS_* credentials as for streaming). Each source file
is converted alone (downloaded into --staging when its worker reaches it, deleted after), its
shards uploaded to OUT/file-FFFFF/ and a done marker written last; --part I/N takes every N-th
file; reruns convert only files without a marker; the merge writes OUT/index.json last. The
endpoint, credentials, bucket, source prefix, OUT's write permission and the staging disk are
checked before any work.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s SOURCE OUT [options]  |  %(prog)s --synthetic N OUT [options]  |  "
                                      "%(prog)s --merge OUT")
    p.add_argument("paths", nargs="+", metavar="SOURCE OUT",
                   help="what to convert (folder, .csv/.tsv/.jsonl, .tar or folder of them, .parquet or folder "
                        "of them, Karpathy .json, or s3://bucket/prefix of .tar/.parquet) and the MDS directory (or s3:// "
                        "prefix) to create; only OUT with --synthetic")
    p.add_argument("--workers", type=int, help="processes reading, checking and writing (default: min(8, CPUs)); "
                   "the dataset is the same for any number")
    p.add_argument("--shard-size", "--shard-size-mb", dest="shard_size_mb", type=int, default=64, metavar="MIB",
                   help="shard size limit in MiB (default: 64); a shard also ends with each block of 1,024 pairs")
    p.add_argument("--compression", help="shard compression MDS supports: zstd, zstd:LEVEL (1-22), br, gz, bz2, "
                   "snappy (default: none). The training loader decompresses on first read; the evaluation reader "
                   "needs uncompressed shards")
    p.add_argument("--max-side", type=int, metavar="PX", help="re-encode images whose longer side exceeds PX "
                   "(aspect kept, JPEG quality 95, transparency onto white); smaller ones stay byte for byte")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory, "
                   "and drop an interrupted conversion made with other options")
    p.add_argument("--image-column", help="CSV/TSV/JSONL/parquet column holding the image path or bytes "
                   "(default: the first of image, filepath, path, jpg, image_path, file_name, filename; "
                   "for parquet jpg, image, bytes, img, png, webp, jpeg first)")
    p.add_argument("--caption-column", help="CSV/TSV/JSONL/parquet column holding the caption "
                   "(default: the first of caption, text, txt, title)")
    p.add_argument("--label-column", help="CSV/TSV/JSONL/parquet column holding a class label: writes an integer "
                   "`cls` column and classes.json (class names sorted, template 'a photo of a {}.') for zero-shot")
    p.add_argument("--classes", help='zero-shot class file {"classnames": [...], "templates": [...]}: copied into '
                   "the dataset; with --label-column its order gives the class ids and other labels are skipped")
    p.add_argument("--image-root", help="folder that relative image paths of a CSV/TSV/JSONL, parquet or Karpathy "
                   "JSON source start from (default: the folder of that file)")
    p.add_argument("--split", help="Karpathy JSON splits to convert, comma-separated, from train, restval, val, "
                   "test (default: train,restval, the usual training split)")
    p.add_argument("--synthetic", type=int, metavar="N", help="draw N pairs of coloured shapes with captions "
                   "naming colour, shape and place, instead of reading a source (labelled: classes.json written)")
    p.add_argument("--part", metavar="I/N", help="convert only part I of N (0 <= I < N) and publish nothing; "
                   "run every part with the same options, then --merge OUT")
    p.add_argument("--merge", action="store_true", help="publish the N parts converted with --part I/N as one "
                   "dataset at OUT (give only OUT); names the parts still missing")
    p.add_argument("--staging", metavar="DIR", help="local folder where a conversion from or to the object store "
                   "stages source files and shards, a few per worker at a time (default: the system's temporary "
                   "folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default: 0)")
    p.add_argument("--synthetic-size", type=int, default=64, metavar="PX", help="side of --synthetic images "
                   "(default: 64)")
    args = p.parse_args(argv)
    if args.merge:
        if len(args.paths) != 1 or args.part is not None or args.synthetic is not None:
            p.error("give only the OUT directory after --merge (the parts' source and options are recorded)")
        args.source, args.out = None, args.paths[0]
        return args
    expected = 1 if args.synthetic is not None else 2
    if len(args.paths) != expected:
        p.error("give the output directory only, after --synthetic N" if args.synthetic is not None
                else "give a SOURCE and an OUT directory")
    args.source, args.out = (None, args.paths[0]) if expected == 1 else args.paths
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.data.convert import convert, merge
    from engine.data.convert.split import parse_part

    try:
        if args.merge:
            print(merge(args.out, overwrite=args.overwrite).summary())
            return 0
        part = parse_part(args.part) if args.part is not None else None
        report = convert(args.source, args.out, workers=args.workers, shard_size_mb=args.shard_size_mb,
                         overwrite=args.overwrite, image_column=args.image_column,
                         caption_column=args.caption_column, label_column=args.label_column,
                         classes=args.classes, split=args.split, image_root=args.image_root,
                         max_side=args.max_side, compression=args.compression, synthetic=args.synthetic,
                         seed=args.seed, synthetic_size=args.synthetic_size, part=part,
                         staging=args.staging)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
