"""The CLIP model: two towers and one learnable temperature. Knows nothing of losses or ranks."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.presets import ModelPreset
from engine.models.towers import ImageTower, TextTower, TowerOutput

# CLIP: logit scale s = exp(t), t initialised to ln(1/0.07), s clamped at 100.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


class LogitScale(nn.Module):
    """s = exp(t), clamped at `max_scale` (CLIP: 100; None: unclamped, as CLIP-Lite). A module of its own so that ZeRO-3, which materialises a
    module's parameters only while its forward runs, gathers `t` whenever it is read.
    `t` is stored with shape [1], not as a 0-dim tensor: DeepSpeed's initial parameter
    broadcast reinterprets each parameter's bytes, which a 0-dim tensor does not allow."""

    def __init__(self, max_scale: float | None = LOGIT_SCALE_MAX):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        # exp and clamp in fp32 whatever the weights' dtype: a bf16 result would add its own
        # rounding (8 significant bits) to that of t's bf16 copy.
        scale = self.log_scale.float().exp()
        return (scale if self.max_scale is None else scale.clamp(max=self.max_scale))[0]


class TwoTower(nn.Module):
    def __init__(self, preset: ModelPreset, eot_id: int, sot_id: int, activation_checkpointing: bool = False):
        super().__init__()
        self.image = ImageTower(preset)
        self.text = TextTower(preset, eot_id, sot_id)
        self.checkpoint_activations(activation_checkpointing)
        self.logit_scale = LogitScale(preset.logit_scale_max)
        self.text_width = preset.text_width
        self.embed_dim = preset.embed_dim
        # Set to torch.bfloat16 to run the towers under autocast over fp32 weights (the plan's
        # bf16 without ZeRO, engine/plan/precision.py); their outputs come back in fp32.
        self.autocast_dtype: torch.dtype | None = None
        # Towers locked whole (--lock, engine/models/locking.py): they stay in eval mode.
        self.locked_towers: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "TwoTower":
        super().train(mode)
        for which in self.locked_towers:
            getattr(self, which).eval()
        return self

    def checkpoint_activations(self, enabled: bool) -> None:
        """Both towers recompute their blocks in the backward (the plan's activation_checkpointing,
        engine/models/activation_checkpointing.py): the same losses and gradients, less memory."""
        self.image.checkpoint_activations(enabled)
        self.text.checkpoint_activations(enabled)

    def image_outputs(self, images: torch.Tensor) -> TowerOutput:
        """Unnormalised embedding and pre-projection features, for objectives that need both."""
        # Images arrive as fp32 from the loader; the towers may run in bf16/fp16 under DeepSpeed.
        images = images.to(self.logit_scale.log_scale.dtype)
        return self._autocast(self.image, images)

    def text_outputs(self, tokens: torch.Tensor) -> TowerOutput:
        """Unnormalised embedding, pooled features and per-token states."""
        return self._autocast(self.text, tokens)

    def _autocast(self, tower: nn.Module, inputs: torch.Tensor) -> TowerOutput:
        if self.autocast_dtype is None:
            return tower(inputs)
        with torch.autocast(inputs.device.type, dtype=self.autocast_dtype):
            outputs = tower(inputs)
        # What follows the towers (heads, loss) runs in fp32, as on fp32 weights.
        return TowerOutput(*(None if x is None else x.float() for x in outputs))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_outputs(images).embedding
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_outputs(tokens).embedding
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        return self.logit_scale()


def count_parameters(preset: ModelPreset, eot_id: int, sot_id: int) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = TwoTower(preset, eot_id, sot_id)
    return sum(p.numel() for p in model.parameters())
