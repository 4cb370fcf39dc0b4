"""Pretrain a CLIP model. Every setting not given here is derived and printed as a plan.

  deepspeed launchers/pretrain.py                                   # small CLIP on built-in digits
  deepspeed launchers/pretrain.py --method declip                   # DeCLIP (or clip-lite)
  deepspeed --num_gpus 2 launchers/pretrain.py --zero-stage 2       # two ranks
  deepspeed launchers/pretrain.py --model vit-b-32 --data /data/mds/pairs --epochs 32
  deepspeed launchers/pretrain.py --data s3://bucket/laion:0.7,/data/mds/cc3m:0.3   # a mixture, streamed
  python launchers/pretrain.py --model rn50 --dry-run               # print the plan and exit
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402


OPTION_DEST = "objective_option__"   # argparse dest prefix of the objectives' own options


def declared_options(method: str | None) -> dict:
    """name -> (Option, [methods declaring it]) over every registered method and `method` (a
    plug-in given as package.module:Class); a method that does not import is left to the
    planner, which says why."""
    from engine.objectives.registry import method_names, objective_class

    methods = method_names() + ([method] if method and method not in method_names() else [])
    declared: dict = {}
    for name in methods:
        try:
            cls = objective_class(name)
        except UserError:
            continue
        for option in cls.options:
            if option.dial:
                declared.setdefault(option.name, (option, []))[1].append(name)
    return declared


def parse_args(argv=None) -> argparse.Namespace:
    from engine.objectives.registry import DEFAULT_METHOD, method_names

    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--method", default=DEFAULT_METHOD)
    method_given = early.parse_known_args(argv)[0].method
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dials = p.add_argument_group("dials")
    dials.add_argument("--method", default=DEFAULT_METHOD,
                       help=f"{' | '.join(method_names())}, or your own objective as package.module:Class "
                       f"(default: {DEFAULT_METHOD})")
    dials.add_argument("--model", default="debug",
                       help="debug | vit-debug | rn50 | vit-b-32 | vit-b-16 | any timm image model name")
    dials.add_argument("--data", help="MDS directory or remote URL (s3://, gs://, ...), or a weighted mixture "
                       "of them, e.g. s3://bucket/a:0.7,/data/b:0.3 (default: built-in digits)")
    dials.add_argument("--eval-data", help="held-out MDS directory for zero-shot/retrieval "
                       "(default with the built-in data: its held-out split)")
    dials.add_argument("--eval", action="append", default=[], metavar="TASK:PATH[,OPTION=VALUE]",
                       help="also evaluate on this set at every evaluation (repeatable): "
                       "zeroshot:DIR (an ImageFolder; options classnames=imagenet|FILE, templates=openai|simple|FILE) "
                       "or retrieval:FILE|MDS (a Karpathy .json or MDS directory; options split=, image_root=)")
    dials.add_argument("--out", help="run directory (default runs/<method>-<model>-<time>); "
                       "an existing one is resumed from its latest checkpoint")
    dials.add_argument("--steps", type=int, help="optimizer steps (default: from epochs)")
    dials.add_argument("--epochs", type=float, help="passes over the data (default: recipe)")
    dials.add_argument("--global-batch", type=int, help="pairs per optimizer step, all ranks")
    dials.add_argument("--seed", type=int, default=0)
    dials.add_argument("--data-fraction", type=float, default=1.0,
                       help="train on a fixed subset of this fraction of the data (e.g. 0.1)")
    dials.add_argument("--dry-run", action="store_true", help="write and print the plan, then exit")
    dials.add_argument("--ds", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="raw DeepSpeed config override (repeatable)")
    dials.add_argument("--stop-at-step", type=int, help="end this run after this step with a "
                       "checkpoint, keeping the schedule of the full run (for time-boxed jobs)")
    over = p.add_argument_group("overrides of single decisions (default: derived, see the plan)")
    over.add_argument("--micro-batch", type=int)
    over.add_argument("--accumulation", choices=["feature_cache", "plain"],
                      help="feature_cache: negatives span the global batch however it is split "
                      "into micro-batches; plain: each micro-batch contrasts within itself")
    over.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    over.add_argument("--zero-stage", type=int)
    over.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None)
    over.add_argument("--optimizer", choices=["apex_fused", "deepspeed_fused", "torch_fused",
                                              "torch", "deepspeed_cpu_adam", "sgd_lookahead"])
    over.add_argument("--lr", type=float)
    over.add_argument("--warmup-steps", type=int)
    over.add_argument("--workers", type=int, help="data workers per rank")
    over.add_argument("--cache-limit", metavar="SIZE", help="disk that remote shards may take on each node, "
                      "e.g. 20gb (the least recently used are evicted); the cache lives under $CLIPZERO_CACHE")
    over.add_argument("--decode-device", choices=["gpu", "cpu"])
    over.add_argument("--checkpoint-every", type=int)
    over.add_argument("--eval-every", type=int)
    over.add_argument("--log-every", type=int)
    over.add_argument("--text-layers", type=int, help="text tower depth (CLIP-Lite: 2/4/6/12)")
    over.add_argument("--collective-timeout", type=int, metavar="SECONDS",
                      help="a rank silent this long (dead, hung) ends the job")
    over.add_argument("--max-requeues", type=int, help="SLURM: times a signalled job requeues "
                      "itself before it stops with its checkpoint")
    method = p.add_argument_group("objective options, declared by each method (default: its recipe)")
    for name, (option, owners) in declared_options(method_given).items():
        method.add_argument("--" + name.replace("_", "-"), dest=OPTION_DEST + name,
                            metavar=(option.kind.__name__.upper() if option.choices is None
                                     else "{" + ",".join(map(str, option.choices)) + "}"),
                            help=f"{', '.join(owners)}: {option.help}")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment.
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dials_from_args(args: argparse.Namespace):
    from engine.plan import Dials

    return Dials(method=args.method, model=args.model, data=args.data, out=args.out,
                 steps=args.steps, epochs=args.epochs, global_batch=args.global_batch,
                 seed=args.seed, micro_batch=args.micro_batch, accumulation=args.accumulation,
                 precision=args.precision,
                 zero_stage=args.zero_stage, offload=args.offload, optimizer=args.optimizer,
                 lr=args.lr, warmup_steps=args.warmup_steps, workers=args.workers,
                 decode_device=args.decode_device, checkpoint_every=args.checkpoint_every,
                 eval_every=args.eval_every, log_every=args.log_every, evals=tuple(args.eval), ds=tuple(args.ds),
                 data_fraction=args.data_fraction, text_layers=args.text_layers, cache_limit=args.cache_limit,
                 objective_options={key[len(OPTION_DEST):]: value for key, value in vars(args).items()
                                    if key.startswith(OPTION_DEST) and value is not None},
                 collective_timeout=args.collective_timeout,
                 max_requeues=args.max_requeues)


def main(argv=None) -> int:
    """Exit status: 0 done (or stopped and requeued by SLURM), 2 bad input, 3 stopped by a
    signal with a checkpoint (run the same command to continue), 4 too many non-finite steps."""
    args = parse_args(argv)
    from engine import launch
    from engine.pretrain import prepare, run
    from engine.train.faults import EXIT_STOPPED, NonFiniteSteps

    try:
        started = launch.setup()
        prepared = prepare(dials_from_args(args), args.eval_data, started)
        if args.stop_at_step is not None and args.stop_at_step < 1:
            raise UserError(f"--stop-at-step {args.stop_at_step}: give a step of at least 1")
        end = run(prepared, out=args.out, dry_run=args.dry_run, stop_at_step=args.stop_at_step)
    except (UserError, NonFiniteSteps) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 4
    return EXIT_STOPPED if end.stopped_at is not None and not end.requeued else 0


if __name__ == "__main__":
    sys.exit(main())
