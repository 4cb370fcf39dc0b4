"""The CLIP model: two towers and one learnable temperature. Knows nothing of losses or ranks."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.presets import ModelPreset
from engine.models.towers import ImageTower, TextTower

# CLIP: logit scale s = exp(t), t initialised to ln(1/0.07), s clamped at 100.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


class LogitScale(nn.Module):
    """s = exp(t), clamped at 100. A module of its own so that ZeRO-3, which materialises a
    module's parameters only while its forward runs, gathers `t` whenever it is read.
    `t` is stored with shape [1], not as a 0-dim tensor: DeepSpeed's initial parameter
    broadcast reinterprets each parameter's bytes, which a 0-dim tensor does not allow."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=LOGIT_SCALE_MAX)[0]


class TwoTower(nn.Module):
    def __init__(self, preset: ModelPreset, eot_id: int, sot_id: int):
        super().__init__()
        self.image = ImageTower(preset)
        self.text = TextTower(preset, eot_id, sot_id)
        self.logit_scale = LogitScale()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        # Images arrive as fp32 from the loader; the towers may run in bf16/fp16 under DeepSpeed.
        x = self.image(images.to(self.logit_scale.log_scale.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        return self.logit_scale()


def count_parameters(preset: ModelPreset, eot_id: int, sot_id: int) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        model = TwoTower(preset, eot_id, sot_id)
    return sum(p.numel() for p in model.parameters())
