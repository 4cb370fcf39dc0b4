"""Pretrain a CLIP model. Every setting not given here is derived and printed as a plan.

  deepspeed launchers/pretrain.py                                   # small CLIP on built-in digits
  deepspeed launchers/pretrain.py --method declip                   # DeCLIP (or clip-lite, siglip)
  deepspeed --num_gpus 2 launchers/pretrain.py --zero-stage 2       # two ranks
  deepspeed launchers/pretrain.py --model vit-b-32 --data /data/mds/pairs --epochs 32
  deepspeed launchers/pretrain.py --data s3://bucket/laion:0.7,/data/mds/cc3m:0.3   # a mixture, streamed
  python launchers/pretrain.py --model rn50 --global-batch 1024 --dry-run   # print the plan and exit
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from engine.plan.dials import add_dial_arguments, method_in

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dial_arguments(p, method_in(argv))
    run = p.add_argument_group("this command")
    run.add_argument("--eval-data", help="held-out MDS directory for zero-shot/retrieval "
                     "(default with the built-in data: its held-out split)")
    run.add_argument("--dry-run", action="store_true", help="write and print the plan, then exit")
    run.add_argument("--stop-at-step", type=int, help="end this run after this step with a "
                     "checkpoint, keeping the schedule of the full run (for time-boxed jobs)")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment.
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit status: 0 done (or stopped and requeued by SLURM), 2 bad input, 3 stopped by a
    signal with a checkpoint (run the same command to continue), 4 too many non-finite steps."""
    args = parse_args(argv)
    from engine import launcher_env
    from engine.plan.dials import dials_from_args
    from engine.training_run import prepare, run
    from engine.train.nonfinite import NonFiniteSteps
    from engine.train.stop_signals import EXIT_STOPPED

    try:
        started = launcher_env.setup()
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
