"""CLIP-Lite's objective (Shrivastava et al., AISTATS 2023): a Jensen-Shannon lower bound on
image-text mutual information, with one negative per positive, plus prior matching.

    T(x, y) = scale * <normalize(g_I(x)), normalize(g_T(y))>       (g: the critic projections)
    jsd     = mean_i softplus(-T(x_i, y_i)) + mean_i softplus(T(x_i, y_{(i+1) mod B}))
    prior   = sum over modalities of -(mean log D(u) + mean log(1 - D(h))),  u ~ U[0, 1)^dim(h)
    loss    = 0.9 * jsd + 0.1 * prior

The critic's projections and temperature belong to the model (zero-shot evaluation compares
in the critic's space); the prior discriminators D, used only by this loss, live here.
Deviations from the reference (4m4n5/CLIP-Lite) are listed in docs/METHODS.md.
"""
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from engine import dist
from engine.models.presets import DEBUG_PRESETS, ModelPreset
from engine.models.two_tower import TwoTower
from engine.objectives.base import Objective, Option, unit_rows
from kernels import jsd_loss

# The reference's weighting: (1 - prior_weight) * jsd + prior_weight * prior (config.py).
PRIOR_WEIGHT = 0.1
NEGATIVES = ("local", "global")
PRIORS = ("cooperative", "adversarial", "off")

# CLIP-Lite's COCO recipe (the paper, section 4, and 4m4n5/CLIP-Lite's configs): global batch
# 1,024 (8 GPUs), SGD momentum 0.9, weight decay 1e-4, Lookahead; per-group LRs image tower
# 0.2, text tower and heads 1e-3; 10k warmup steps then cosine to 0; 250k iterations; gradient
# norm clipped at 10; crops of scale (0.2, 1).
PAPER_RECIPE = dict(global_batch=1024, epochs=0.0, steps=250_000, lr=0.2, min_lr=0.0,
                    warmup_steps=10_000, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8,
                    grad_clip=10.0, crop_scale=(0.2, 1.0), optimizer="sgd_lookahead",
                    momentum=0.9, group_lrs=(("image", 0.2), ("text", 1e-3), ("heads", 1e-3)),
                    source="paper recipe (CLIP-Lite COCO)")
# The CPU smoke run keeps every component of the objective but not its optimiser: SGD +
# Lookahead does not move from-scratch towers in ~100 steps (docs/METHODS.md: at every LR mix
# tried, zero-shot stays near chance), so the smoke run takes AdamW, at 5e-3 (3e-3: 0.60, 1e-2:
# chance, with CLIP's smoke crops; the paper's (0.2, 1) crops on 32 px digits: 0.28). The
# paper recipe (rn50 and the other large presets) keeps SGD + Lookahead.
SMOKE_CHANGES = dict(lr=5e-3, source="smoke-run recipe for CLIP-Lite: AdamW at 5e-3 on the debug towers, "
                                     "built-in digits, CPU (the paper's SGD + Lookahead does not learn in 110 "
                                     "steps from scratch)")

# BERT-base text tower (768 wide, 12 heads, 12 layers by default; the paper ablates 2/4/6/12);
# critic projection blocks 2048 wide; captions cut to 30 tokens (+ start and end); CLIP-Lite
# does not clamp its temperature. For `rn50` the image features are a plain ResNet-50's pooled
# 2048-d output (torchvision layout, no fc), not CLIP's attention-pooled ModifiedResNet.
TEXT = dict(text_tower="bert", text_width=768, text_heads=12, text_layers=12, context_length=32,
            embed_dim=2048, logit_scale_max=None)
# The debug critic keeps every component, only narrower.
DEBUG_TEXT = dict(TEXT, text_width=64, text_heads=2, text_layers=2, embed_dim=128)
IMAGE_TOWER = {"rn50": "resnet50"}


class PriorDiscriminator(nn.Module):
    """D = Linear(in, 1000)-ReLU-Linear(1000, 200)-ReLU-Linear(200, 1), as in the reference's
    `PriorDiscriminator`, returning the logit: the sigmoid is folded into the loss, where
    log-sigmoid stays finite once D is confident."""

    def __init__(self, in_features: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, 1000), nn.ReLU(),
                                    nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def prior_loss(prior_logits: torch.Tensor, feature_logits: torch.Tensor) -> torch.Tensor:
    """-(mean log D(u) + mean log(1 - D(h))) from D's logits, in float32.

    log(1 - sigmoid(z)) = logsigmoid(-z): exact, and finite where 1 - sigmoid(z) rounds to 0.
    D runs in the towers' dtype; its log-sigmoids stay fp32, as every loss term here: in bf16
    the term itself would keep 8 bits (about 3 significant digits).
    """
    log_d_prior = F.logsigmoid(prior_logits.float())
    log_one_minus_d_features = F.logsigmoid(-feature_logits.float())
    return -(log_d_prior.mean() + log_one_minus_d_features.mean())


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward: what lies after it (D) minimises the loss,
    what lies before it (the encoder) maximises it, within one backward pass and one optimiser."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class ClipLiteObjective(Objective):
    """negatives: "local" rolls each rank's micro-batch (the reference); "global" rolls the
    batch gathered from all ranks, so the loss does not depend on how many ranks there are.
    prior: "cooperative" (the reference: one optimiser minimises the prior loss for encoder
    and discriminator alike), "adversarial" (the encoder maximises it through a gradient
    reversal, Deep InfoMax's intent) or "off".
    text_prior: also match the text features to the prior (the reference's config default).
    No per-rank state: the prior's uniform samples come from torch's RNG, which the engine
    checkpoints per rank."""

    augment = "crop_jitter"
    strip_punctuation = True  # the reference lower-cases captions and strips punctuation
    # The critic's BatchNorm normalises over the micro-batch, and the negative is another row of it.
    min_micro_batch = 2
    paper_recipe = PAPER_RECIPE
    smoke_changes = SMOKE_CHANGES
    options = (
        Option("negatives", "local (roll each rank's batch, the reference) or global (roll the gathered batch)",
               default="local", choices=NEGATIVES, reason="{source}: the caption of the next pair in each rank's batch"),
        Option("prior", "cooperative (the reference), adversarial, off", default="cooperative", choices=PRIORS,
               reason="{source}: prior matching minimised jointly with the encoders"),
    )
    # The reference's LR groups by parameter name (4m4n5/CLIP-Lite factories.py: "image_encoder"
    # -> CNN_LR, "text_encoder" -> TRANS_LR, the rest, i.e. its loss module with the critic
    # blocks, temperature and discriminators -> LR). The critic blocks live in the model here,
    # as the towers' projections.
    lr_groups = (
        ("image", ("model.image.trunk.",)),
        ("text", ("model.text.transformer.",)),
        ("heads", ("model.image.proj.", "model.text.proj.", "model.logit_scale.", "objective.")),
    )

    @classmethod
    def adapt_preset(cls, preset: ModelPreset) -> ModelPreset:
        """The critic's towers: a BERT text tower, projection blocks, a plain ResNet-50 for rn50."""
        text = DEBUG_TEXT if preset.name in DEBUG_PRESETS else TEXT
        return replace(preset, image_tower=IMAGE_TOWER.get(preset.name, preset.image_tower),
                       image_projection="critic", **text)

    @classmethod
    def from_plan(cls, model: TwoTower, options: dict, seed: int) -> "ClipLiteObjective":
        return cls(model, negatives=options["negatives"], prior=options["prior"])

    def __init__(self, model: TwoTower, *, negatives: str = "local", prior: str = "cooperative",
                 text_prior: bool = True):
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives={negatives!r}: use one of {', '.join(NEGATIVES)}")
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r}: use one of {', '.join(PRIORS)}")
        self.negatives = negatives
        self.prior_mode = prior
        self.image_prior = PriorDiscriminator(model.image.feature_dim) if prior != "off" else None
        self.text_prior = (PriorDiscriminator(model.text_width)
                           if prior != "off" and text_prior else None)
        self.weights = ({"jsd": 1.0} if prior == "off"
                        else {"jsd": 1.0 - PRIOR_WEIGHT, "prior": PRIOR_WEIGHT})

    def embed(self, model: TwoTower, batch: dict):
        """The critic's normalised embeddings as the JSD kernel takes them (base.unit_rows: bf16
        from bf16 towers; it takes the row dots and the unclamped scale's products in fp32), and
        the prior term, which needs only this batch's features."""
        image = model.image_outputs(batch["image"])
        text = model.text_outputs(batch["text"])
        embeddings = {"image": unit_rows(image.embedding), "text": unit_rows(text.embedding)}
        terms = {} if self.prior_mode == "off" else {"prior": self.prior(image.features, text.features)}
        return embeddings, terms

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor],
                             scale: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = embeddings["image"], embeddings["text"]
        if self.negatives == "global":
            # Every rank computes the whole global batch's loss; the gather's backward sums the
            # ranks' (identical) gradients for this rank's rows, and DeepSpeed's average over
            # ranks divides that sum back: exactly the single-process gradient.
            a, b = dist.all_gather_with_grad(a), dist.all_gather_with_grad(b)
        return {"jsd": jsd_loss(a, b, scale, shift=1)}

    def prior(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Sum of the enabled modalities' prior-matching losses on the towers' raw features."""
        total = self._prior_term(self.image_prior, image_features)
        if self.text_prior is not None:
            total = total + self._prior_term(self.text_prior, text_features)
        return total

    def _prior_term(self, discriminator: PriorDiscriminator, features: torch.Tensor) -> torch.Tensor:
        # Drawn in fp32 so the samples do not depend on the towers' precision, then cast to it
        # (D runs in the same dtype as the towers under DeepSpeed).
        uniform = torch.rand(features.shape, device=features.device, dtype=torch.float32)
        if self.prior_mode == "adversarial":
            features = _ReverseGradient.apply(features)
        # One call on [u; h] rather than two: D has no batch-dependent layer, so the logits are
        # the same, and ZeRO-3 gathers D's weights once.
        logits = discriminator(torch.cat([uniform.to(features.dtype), features]))
        n = uniform.shape[0]
        return prior_loss(logits[:n], logits[n:])
