"""DeCLIP's objective (Li et al., ICLR 2022, "Supervision Exists Everywhere").

Each sample comes as two image views (MoCo-v2 augmentations) and two text views (the
MLM-masked caption and an EDA copy). Four named terms, weighted as the reference's YFCC15M
configs (clip 0.4, simsiam 0.2, mlm 0.2, nn 0.2):

  clip     symmetric InfoNCE over the four (image view, text view) pairs, averaged; each
           rank's rows against the columns gathered with gradient from every rank.
  simsiam  SimSiam between the two image views, on the unnormalised image embedding
           (after the tower's projection).
  mlm      cross-entropy of a linear head over the masked positions' text-tower states.
  nn       each image view against the nearest neighbours of each text view in a FIFO queue
           of past text embeddings; image-anchored, neighbours gathered from every rank.

All four are fp32 losses whatever precision the towers and heads run in. clip's kernels take
the embeddings as base.unit_rows gives them (bf16 from bf16 towers) and accumulate in fp32; nn,
SimSiam and MLM compute in fp32 (each says why where it does).
"""
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from engine import dist
from engine.data.mlm import IGNORE_INDEX, MASK_ID, VOCAB_WITH_MASK
from engine.errors import UserError
from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower
from engine.objectives.base import Objective, Option, OptionContext, unit_rows
from kernels import contrastive_loss_local, nearest_neighbors

# DeCLIP's YFCC15M configs (experiments/declip_experiments/yfcc15m/*/config.yaml in
# Sense-GVT/DeCLIP), the same for ResNet-50 and ViT-B/32: AdamW (0.9, 0.98), eps 1e-8, weight
# decay 0.1; LR warmed from 1e-4 to 1e-3 over 2,500 steps, then cosine to 0; 128 per GPU x 32
# GPUs; 32 epochs (the paper); MoCo-v2 crops; no gradient-norm clipping; NN queue of 65,536.
# Applied to other towers as the best available guess.
PAPER_RECIPE = dict(global_batch=4096, epochs=32, lr=1e-3, min_lr=0.0, warmup_steps=2500,
                    warmup_start_lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8,
                    grad_clip=None, crop_scale=(0.2, 1.0), options=(("queue_size", 65_536),),
                    source="paper recipe (DeCLIP YFCC15M config)")
# The CPU smoke run keeps every component, at the smoke run's batch and length.
SMOKE_CHANGES = dict(crop_scale=(0.2, 1.0), options=(("queue_size", 1024),))
ENQUEUE = ("global", "rank")


def _queue_size(given: int | None, context: OptionContext) -> tuple[int, str]:
    if given is not None:
        if given < 1:
            raise UserError(f"--queue-size {given} must be at least 1")
        return given, "--queue-size given"
    recipe = context.recipe
    size = dict(recipe.options)["queue_size"]
    if size > context.dataset_size:
        return context.dataset_size, f"recipe's {size:,} capped at the {context.dataset_size:,} training pairs"
    return size, recipe.source


def _synonyms(given, context: OptionContext) -> tuple[bool, str]:
    if context.wordnet is not None:
        return True, f"EDA draws synonyms from WordNet at {context.wordnet}"
    return False, ("no WordNet database found (apt-get install wordnet-base, or NLTK's wordnet corpus): "
                   "EDA swaps and deletes words only")


# The reference's SimSiam widths, fixed whatever the embedding width.
PROJECTOR_WIDTH = 1024
PREDICTOR_HIDDEN = 512


def simsiam_projector(in_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN, as SimSiam's projector (output BN, no ReLU)."""
    w = PROJECTOR_WIDTH
    return nn.Sequential(
        nn.Linear(in_dim, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, w), nn.BatchNorm1d(w),
    )


def simsiam_predictor() -> nn.Sequential:
    """Linear-BN-ReLU-Linear: a bottleneck without BN on its output (SimSiam found that unstable)."""
    return nn.Sequential(
        nn.Linear(PROJECTOR_WIDTH, PREDICTOR_HIDDEN), nn.BatchNorm1d(PREDICTOR_HIDDEN), nn.ReLU(),
        nn.Linear(PREDICTOR_HIDDEN, PROJECTOR_WIDTH),
    )


def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean cos(p, stopgrad(z)): the stop-gradient is what keeps SimSiam from collapsing. In
    fp32 whatever the heads run in: the loss creeps towards -1, where bf16's steps are 0.004."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


class DeclipObjective(Objective):
    """Owns DeCLIP's heads (SimSiam projector and predictor, MLM head) and the NN queue.

    The queue is deliberately neither a parameter nor a registered buffer: DeepSpeed would cast
    it to bf16 with the module, and the loop averages floating buffers over ranks before
    evaluation and checkpoints, which would mix per-rank queues. It is a plain fp32 tensor,
    created on the embeddings' device at the first forward and saved through `rank_state`.
    It stays fp32 under bf16 towers (their rows are exact in it): its random first rows keep
    full precision, and a checkpoint's queue is the same whatever precision wrote it.
    """

    # What the loader must yield.
    image_views = 2
    augment = "moco_v2"
    text_aug = True
    mlm = True
    weights = {"clip": 0.4, "simsiam": 0.2, "mlm": 0.2, "nn": 0.2}
    # SimSiam's heads normalise over the micro-batch (BatchNorm1d).
    min_micro_batch = 2
    paper_recipe = PAPER_RECIPE
    smoke_changes = SMOKE_CHANGES
    options = (
        Option("queue_size", "nearest-neighbour queue length", kind=int, decide=_queue_size),
        Option("enqueue", "global (every rank enqueues the global batch) or rank (each rank its own, as the "
               "reference)", default="global", choices=ENQUEUE,
               reason="every rank enqueues the whole global batch, so queues agree across ranks "
                      "(the reference enqueues per rank)"),
        Option("eda_synonyms", "whether EDA can draw synonyms", dial=False, decide=_synonyms),
    )

    @classmethod
    def adapt_preset(cls, preset: ModelPreset) -> ModelPreset:
        """The MLM mask token joins the text vocabulary."""
        return replace(preset, vocab_size=VOCAB_WITH_MASK)

    @classmethod
    def from_plan(cls, model: TwoTower, options: dict, seed: int) -> "DeclipObjective":
        return cls(model, queue_size=options["queue_size"], enqueue=options["enqueue"], seed=seed)

    def __init__(self, model: TwoTower, *, queue_size: int, enqueue: str = "global", seed: int = 0):
        super().__init__()
        if enqueue not in ("global", "rank"):
            raise ValueError(f"enqueue must be 'global' or 'rank', got {enqueue!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        # The embedding table's row count; reading the module attribute (not its weight) is
        # safe under ZeRO-3, where the weight may be partitioned away.
        vocab_size = model.text.transformer.get_input_embeddings().num_embeddings
        if vocab_size <= MASK_ID:
            raise UserError(f"DeCLIP's text tower needs the mask token (id {MASK_ID}) in its "
                            f"vocabulary, but it has {vocab_size} ids: build the model from "
                            "engine.objectives.method.lookup('declip', model).preset")
        self.projector = simsiam_projector(model.embed_dim)
        self.predictor = simsiam_predictor()
        # Reads the final layer-normed token states, as the reference's text_label_predictor.
        self.mlm_head = nn.Linear(model.text_width, vocab_size)
        self.queue_size = queue_size
        self.enqueue = enqueue
        self.seed = seed
        self.embed_dim = model.embed_dim
        self.queue: torch.Tensor | None = None  # [queue_size, embed_dim], fp32, unit rows
        self.pointer = 0                        # the slot the next enqueued row goes to

    def embed(self, model: TwoTower, batch: dict):
        """The four normalised views the cross terms compare, and SimSiam and MLM, which need
        only this batch."""
        # Each view through its tower on its own, as the reference: BatchNorm in an image tower
        # then normalises each view's batch separately.
        view1 = model.image_outputs(batch["image"]).embedding
        view2 = model.image_outputs(batch["image2"]).embedding
        caption = model.text_outputs(batch["text"])
        text_aug = model.text_outputs(batch["text_aug"]).embedding
        embeddings = {name: unit_rows(x) for name, x in (
            ("image", view1), ("image2", view2), ("text", caption.embedding), ("text_aug", text_aug))}
        return embeddings, {"simsiam": self._simsiam(view1, view2),
                            "mlm": self._mlm(caption.token_states, batch["mlm_labels"])}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor],
                             scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """clip and nn on this rank's rows of the step; in training, then enqueues the step's
        captions (so once per optimizer step however the step was accumulated)."""
        images = [embeddings["image"], embeddings["image2"]]
        texts = [embeddings["text"], embeddings["text_aug"]]
        images_all = [dist.all_gather_with_grad(x) for x in images]
        texts_all = [dist.all_gather_with_grad(x) for x in texts]
        offset = dist.rank() * images[0].shape[0]
        clip = sum(contrastive_loss_local(image, text, image_all, text_all, offset, scale)
                   for image, image_all in zip(images, images_all)
                   for text, text_all in zip(texts, texts_all)) / 4
        return {"clip": clip, "nn": self._nearest_neighbour(images, texts, texts_all, offset, scale)}

    def _simsiam(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # One view per call (as the reference), so the heads' BatchNorm statistics are each
        # view's, and only this rank's: the reference uses plain, unsynchronised BatchNorm.
        z1, z2 = self.projector(view1), self.projector(view2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (_negative_cosine(p1, z2) + _negative_cosine(p2, z1)) / 2

    def _mlm(self, token_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chosen = labels != IGNORE_INDEX
        # The vocabulary-wide head sees only the chosen positions (about 15% of the tokens).
        # It runs even when none is chosen: under ZeRO-3 its forward gathers its weight, a
        # collective every rank must join.
        # Cross-entropy in fp32: its log-sum-exp runs over the whole vocabulary (49,409 ids).
        logits = self.mlm_head(token_states[chosen]).float()
        # Sum / max(count, 1) rather than a mean: a batch with no chosen position gives 0 with
        # a graph (the mean of nothing is NaN). Averaged over this rank's positions only, as
        # the reference.
        return F.cross_entropy(logits, labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)

    def _nearest_neighbour(self, images: list[torch.Tensor], texts: list[torch.Tensor],
                           texts_all: list[torch.Tensor], offset: int,
                           scale: torch.Tensor) -> torch.Tensor:
        queue = self._queue_on(texts[0].device)
        labels = torch.arange(images[0].shape[0], device=images[0].device) + offset
        loss = 0.0
        for text in texts:
            # Both lookups see the queue as it was before this step's enqueue. Indexing copies
            # the rows, so the enqueue below cannot change these targets.
            _, index = nearest_neighbors(text.detach(), queue, k=1)
            neighbours = queue[index[:, 0]]
            # Targets are detached: the gather only collects every rank's columns, its backward
            # never runs. Local image rows against all ranks' neighbours, as the reference.
            neighbours_all = dist.all_gather_with_grad(neighbours)
            for image in images:
                # In fp32, the queue's dtype: a plain [n, N] product with no kernel to accumulate
                # in fp32 for it (a no-op cast for fp32 towers).
                loss = loss + F.cross_entropy(scale * image.float() @ neighbours_all.T, labels)
        if self.training:
            self._enqueue(texts, texts_all)
        return loss / 4

    @torch.no_grad()
    def _enqueue(self, texts: list[torch.Tensor], texts_all: list[torch.Tensor]) -> None:
        # The reference's order: the EDA view first, then the caption. "global": every rank
        # pushes the whole gathered batch in rank order, so all queues stay identical and equal
        # a single process's on the global batch; "rank": own rows only, as the reference.
        caption, text_aug = texts_all if self.enqueue == "global" else texts
        self._push(torch.cat([text_aug, caption]).detach())

    def _push(self, rows: torch.Tensor) -> None:
        """FIFO with wrap-around: rows go to consecutive slots from the pointer, modulo the size."""
        count = rows.shape[0]
        # A push longer than the queue leaves only its newest rows, as row-by-row pushes would.
        rows = rows[-self.queue_size:]
        start = self.pointer + count - rows.shape[0]
        slots = (start + torch.arange(rows.shape[0], device=self.queue.device)) % self.queue_size
        self.queue[slots] = rows.to(self.queue.dtype)
        self.pointer = (self.pointer + count) % self.queue_size

    def _queue_on(self, device: torch.device) -> torch.Tensor:
        if self.queue is None:
            # Random unit vectors, as the reference, but drawn from `seed` on the CPU so every
            # rank (and every device type) starts from the same queue.
            generator = torch.Generator().manual_seed(self.seed)
            self.queue = F.normalize(torch.randn(self.queue_size, self.embed_dim,
                                                 generator=generator), dim=-1)
        if self.queue.device != device:
            self.queue = self.queue.to(device)
        return self.queue

    def rank_state(self) -> dict:
        """This rank's queue (a CPU copy) and pointer, for the per-rank checkpoint file."""
        queue = self._queue_on(self.queue.device if self.queue is not None else torch.device("cpu"))
        return {"queue": queue.detach().to("cpu", copy=True), "pointer": self.pointer}

    def load_rank_state(self, state: dict) -> None:
        queue = state["queue"]
        if tuple(queue.shape) != (self.queue_size, self.embed_dim):
            raise UserError(f"the checkpoint's DeCLIP queue is {tuple(queue.shape)} but this run's is "
                            f"({self.queue_size}, {self.embed_dim}): resume with the same model "
                            "and the same data (the queue size is capped by the dataset size)")
        # Kept where it was loaded; the next forward moves it to the embeddings' device.
        self.queue = queue.detach().float().clone()
        self.pointer = int(state["pointer"])
