"""What every objective declares: the data it needs, its loss weights, its per-rank state.

An objective is an nn.Module that owns its heads and state and maps (model, batch) to named
fp32 loss terms. The class attributes below tell the loader what each sample must carry;
the defaults are CLIP's (one cropped view, the caption as it is).
"""
from torch import nn


class Objective(nn.Module):
    image_views = 1              # 2: a second augmented view under "image2"
    augment = "crop"             # the augmentation family (engine/data/augment.py)
    text_aug = False             # an EDA copy of the caption under "text_aug"
    mlm = False                  # "text" MLM-masked, targets under "mlm_labels"
    strip_punctuation = False    # captions lower-cased and stripped of punctuation
    # True where the loss is a function of per-sample embeddings alone, gathered over ranks:
    # then `embed` and `loss_from_embeddings` exist and gradient accumulation can keep the
    # global-batch loss (engine/train/gradcache.py).
    feature_cache = False
    weights: dict[str, float]    # term name -> weight in the total loss

    def rank_state(self) -> dict:
        """State kept per rank outside parameters and buffers, saved with each checkpoint."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no per-rank state, got {sorted(state)}")
