"""Patch dropout (FLIP's image masking) and its unmasked tuning: the plan's two rows.

FLIP (Li, Fan, Hu, Feichtenhofer, He, "Scaling Language-Image Pre-training via Masking",
CVPR 2023, arXiv:2212.00794) drops a random share of a ViT's patch tokens before the
transformer in training, and encodes whole images at evaluation. What the recipe here takes
from it:
- the ratio is the user's (`--patch-dropout R`); the paper trains at 50% (its default, batch
  32k) and 75% (batch 64k); table 1a: 69.6 zero-shot at 50% against 68.6 unmasked, ViT-L/16,
  6.4 epochs of LAION-400M, with the batch doubled at the same memory;
- "unmasked tuning": training goes on with R = 0 for "an extra 0.32 epoch on the pre-training
  dataset" (section 4.1, table 1e: +0.5 at 50%, +1.3 at 75%), at a base LR lowered from 4e-6 to
  4e-8 with a shorter warmup (appendix A.1). Here it is the last `unmasked_steps` steps of the
  same run: its cosine schedule's tail already runs at about 1% of the peak LR or less (the
  last 5% of a cosine average 0.2% of the peak), the paper's lowered LR in order of magnitude,
  and the loop knows each step, so a resume on either side of the boundary is exact. Default:
  0.32 epoch of this run's data, at most 5% of the run (0.32 of the 6.4 epochs the paper's
  ablations trained).
open_clip does the tuning as a second run instead (its flag's help: `--force-patch-dropout`
"for fine tuning with no dropout near the end as in the paper"); resuming this run with
`--patch-dropout 0` does the same here.

Neither row must match on resume: the layer holds no parameters (the checkpoint fits any R),
the data order does not depend on it, and the masks are drawn from torch's RNG, which the
checkpoint carries; the rate at each step is a function of the step (`rate_at`).
"""
import math

from engine.errors import UserError
from engine.models.presets import ModelPreset
from engine.models.towers import drops_patches
from engine.plan.dials import Dials

FLIP_UNMASKED_EPOCHS = 0.32        # section 4.1, table 1e
MAX_UNMASKED_PERCENT = 5           # 0.32 of the 6.4 epochs of its ablations


def patch_dropout_decisions(dials: Dials, preset: ModelPreset, total_steps: int,
                            steps_per_epoch: int) -> list[tuple[str, object, str]]:
    """(name, value, reason) of `patch_dropout` and `unmasked_steps`; refuses a ratio outside
    [0, 1), an image tower without patch tokens, and tuning steps the run cannot hold."""
    rate = dials.patch_dropout
    if rate is not None:
        if not 0 <= rate < 1:
            raise UserError(f"--patch-dropout {rate:g} must lie in [0, 1): the share of patch tokens dropped "
                            "in training, e.g. 0.5 (FLIP's default)")
        if not drops_patches(preset):
            raise UserError(f"--patch-dropout needs a ViT image tower, and --model {preset.name} "
                            f"({preset.image_tower}) has no patch tokens: use a ViT preset (vit-debug, vit-b-32, "
                            "vit-b-16, vit-l-14, vit-h-14), or drop --patch-dropout")
    if not rate:
        if dials.unmasked_steps is not None:
            raise UserError(f"--unmasked-steps {dials.unmasked_steps} ends patch dropout, which this run does not "
                            "use: add --patch-dropout R (e.g. 0.5) or drop --unmasked-steps")
        reason = ("--patch-dropout 0 given: every patch token encoded" if rate == 0 else
                  "off (--patch-dropout R drops that share of a ViT's patch tokens in training: FLIP)")
        return [("patch_dropout", 0.0, reason), ("unmasked_steps", 0, "no patch dropout")]
    dropped = (f"--patch-dropout given: {rate:.0%} of the patch tokens dropped at random in each training "
               "forward (the class token kept); whole images at evaluation and export")
    return [("patch_dropout", rate, dropped), ("unmasked_steps", *_unmasked_steps(dials, total_steps, steps_per_epoch))]


def _unmasked_steps(dials: Dials, total_steps: int, steps_per_epoch: int) -> tuple[int, str]:
    if dials.unmasked_steps is not None:
        if not 0 <= dials.unmasked_steps < total_steps:
            raise UserError(f"--unmasked-steps {dials.unmasked_steps} must lie between 0 and the {total_steps:,} "
                            f"steps of the run (exclusive): use --unmasked-steps {max(0, total_steps // 20)} "
                            "or fewer")
        return dials.unmasked_steps, "--unmasked-steps given" + _from(dials.unmasked_steps, total_steps)
    flip = math.ceil(FLIP_UNMASKED_EPOCHS * steps_per_epoch)
    tuning = min(flip, total_steps * MAX_UNMASKED_PERCENT // 100)
    return tuning, (f"FLIP's unmasked tuning (Li et al. 2023, table 1e): {FLIP_UNMASKED_EPOCHS} epoch ({flip:,} "
                    f"steps), at most {MAX_UNMASKED_PERCENT}% of the run" + _from(tuning, total_steps))


def _from(tuning: int, total_steps: int) -> str:
    if not tuning:
        return "; none: masked to the end"
    return f": steps {total_steps - tuning + 1:,}..{total_steps:,} encode every patch token"


def rate_at(step: int, rate: float, total_steps: int, unmasked_steps: int) -> float:
    """The patch dropout of optimizer step `step` (1-based, as logged): the last
    `unmasked_steps` steps of the run encode every token."""
    return 0.0 if step > total_steps - unmasked_steps else rate
