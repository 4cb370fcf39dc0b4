"""Model FLOPs per training sample, and what they make of the measured throughput.

Counted, not estimated: torch's FlopCounterMode runs one forward of each tower for a single
sample at the run's image size and context length, on the meta device (no memory, no compute,
well under a second even for ViT-B/16). It counts matrix multiplies and convolutions (2 FLOPs
per multiply-add), attention included; elementwise work (norms, activations, softmax) is left
out, as usual. A tower whose forward reads values (transformers' BERT looks at its attention
mask) is counted on the CPU instead, with zeroed weights: FLOPs do not depend on them.

A sample costs one image-tower forward per image view the objective encodes and one
text-tower forward per text view (DeCLIP: two of each; CLIP and CLIP-Lite: one of each).
Objective heads are left out (DeCLIP's SimSiam and MLM heads, CLIP-Lite's prior discriminators:
under 1% of the towers at the ViT and RN50 presets; the debug preset's tiny towers make them a
larger share). Training costs 3x the forward: the backward computes
gradients for both activations and weights, each about one forward's multiplies. These are
model FLOPs: recomputation is not counted (the feature-cache accumulation's extra forward, as
MFU in PaLM, Chowdhery et al. 2022, appendix B, excludes rematerialisation).

    TFLOP/s = training FLOPs per sample x samples/s (global) / 1e12
    MFU     = TFLOP/s / (peak TFLOP/s of one device x world size)

MFU needs the device's peak, known here for common data-centre GPUs at bf16/fp16 (the dense
tensor-core rates of PEAK_TFLOPS); elsewhere (the CPU, fp32 runs, an unlisted GPU) TFLOP/s is
logged and MFU is not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower

TRAINING_PER_FORWARD = 3  # forward + backward (activations' and weights' gradients)

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks, TFLOP/s per device, matched in order
# against torch's device name (lower case; every listed word must appear). From NVIDIA's
# product pages and datasheets:
#   A100, A30, A40, A10   https://www.nvidia.com/en-us/data-center/a100/ (and /a30/, /a40/, /products/a10-gpu/)
#   H100 SXM/PCIe/NVL     https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM/NVL          https://www.nvidia.com/en-us/data-center/h200/
#   B200                  NVIDIA's Blackwell datasheet (the source torchtitan's peak table cites),
#                         https://nvdam.widen.net/s/wwnsxrhm2w/blackwell-datasheet-3384703
#   L40S, L40, L4         https://www.nvidia.com/en-us/data-center/l40s/ (and /l40/, /l4/)
#   V100 (fp16 only)      https://www.nvidia.com/en-us/data-center/v100/ (SXM2 125, PCIe 112, V100S 130)
#   T4 (fp16 only)        https://www.nvidia.com/en-us/data-center/tesla-t4/
# AWS's A10G is left out: NVIDIA publishes no tensor-core rate for it.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("b200",), 2250.0),
    (("h200", "nvl"), 835.0), (("h200",), 989.0),
    (("h100", "nvl"), 835.0), (("h100", "pcie"), 756.0), (("h100",), 989.0),
    (("a100",), 312.0), (("a30",), 165.0), (("a40",), 149.7), (("a10",), 125.0),
    (("l40s",), 362.0), (("l40",), 181.0), (("l4",), 121.0),
    (("v100s",), 130.0), (("v100", "pcie"), 112.0), (("v100",), 125.0),
    (("t4",), 65.0),
)
PEAK_PRECISIONS = ("bf16", "fp16")  # the table's rates; fp32 runs on other units


def peak_tflops(device_name: str, precision: str) -> float | None:
    """One device's dense bf16/fp16 peak, or None when not known for this device and precision."""
    if precision not in PEAK_PRECISIONS:
        return None
    words = device_name.lower().replace("-", " ").split()
    for needed, peak in PEAK_TFLOPS:
        # Whole words or their prefixes ("a100" in "a100 sxm4 80gb"), never inside another
        # model's name ("a10" must not match "a100", "l4" not "l40s").
        if all(any(_names(word, name) for word in words) for name in needed):
            return peak
    return None


def _names(word: str, name: str) -> bool:
    """`word` of a device name is model `name`, perhaps with a memory or form suffix
    ("h100" in "h100", "v100" in "v100 sxm2 32gb" split on dashes, "a100" in "a100 80gb")."""
    return word == name or (word.startswith(name) and not word[len(name)].isalnum())


def forward_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of `module(example)`, counted on the module's device. Attention runs as plain
    matrix multiplies: the counter has no formula for the CPU's fused attention kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(example)
    return counter.get_total_flops()


def tower_flops(tower: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of a tower built on the meta device; on the CPU with zeroed
    weights when its forward needs values (a data-dependent branch fails on meta tensors)."""
    try:
        return forward_flops(tower, example.to("meta"))
    except (RuntimeError, NotImplementedError):
        tower.to_empty(device="cpu")
        with torch.no_grad():  # zeros, not leftover memory: buffers hold indices (BERT's position ids)
            for tensor in (*tower.parameters(), *tower.buffers()):
                tensor.zero_()
        return forward_flops(tower, example)


@dataclass(frozen=True)
class ModelFlops:
    image_forward: int    # one image through the image tower
    text_forward: int     # one token row through the text tower
    image_views: int      # image-tower forwards per sample
    text_views: int       # text-tower forwards per sample
    peak_tflops: float | None  # one device's, or None when unknown
    world_size: int
    device_name: str
    precision: str

    @property
    def training_per_sample(self) -> int:
        forward = self.image_views * self.image_forward + self.text_views * self.text_forward
        return TRAINING_PER_FORWARD * forward

    def rates(self, samples_per_s: float) -> dict[str, float]:
        """TFLOP/s achieved over all ranks at `samples_per_s` (global), and MFU when the peak is known."""
        achieved = self.training_per_sample * samples_per_s / 1e12
        out = {"tflops_per_s": achieved}
        if self.peak_tflops is not None:
            out["mfu"] = achieved / (self.peak_tflops * self.world_size)
        return out

    def describe(self) -> str:
        """One line for the log and the plan."""
        line = (f"model FLOPs per training sample: {self.training_per_sample / 1e9:.4g} G = "
                f"{TRAINING_PER_FORWARD} x (image tower {self.image_forward / 1e9:.4g} G x {self.image_views} "
                f"view(s) + text tower {self.text_forward / 1e9:.4g} G x {self.text_views} view(s)) "
                f"forward, objective heads left out; ")
        if self.peak_tflops is not None:
            return line + (f"MFU against {self.device_name}'s {self.peak_tflops:g} TFLOP/s {self.precision} "
                           f"dense peak x {self.world_size} device(s)")
        if peak_tflops(self.device_name, PEAK_PRECISIONS[0]) is None:
            why = f"no peak known for {self.device_name}"
        else:
            why = f"the table holds {'/'.join(PEAK_PRECISIONS)} peaks, this run is {self.precision}"
        return line + f"TFLOP/s logged, MFU not ({why})"


def views_encoded(objective) -> tuple[int, int]:
    """(image views, text views) the objective sends through the towers per sample, from what
    it declares it needs (engine/objectives/base.py): each image view once, the caption once
    (MLM-masked or not), and the EDA copy once more when it asks for one."""
    return objective.image_views, 1 + int(objective.text_aug)


def count_model_flops(preset: ModelPreset, eot_id: int, sot_id: int, *, views: tuple[int, int],
                      device_name: str, precision: str, world_size: int) -> ModelFlops:
    """The towers' forward FLOPs for one sample; `views`: (image, text) forwards per sample."""
    with torch.device("meta"):
        model = TwoTower(preset, eot_id, sot_id)
    model.eval()
    image = torch.zeros(1, 3, preset.image_size, preset.image_size)
    # A caption filling the context: start token, filler, end token in the last position.
    tokens = torch.zeros(1, preset.context_length, dtype=torch.long)
    tokens[0, 0], tokens[0, -1] = sot_id, eot_id
    return ModelFlops(image_forward=tower_flops(model.image, image), text_forward=tower_flops(model.text, tokens),
                      image_views=views[0], text_views=views[1],
                      peak_tflops=peak_tflops(device_name, precision), world_size=world_size,
                      device_name=device_name, precision=precision)
