"""The plan for the large presets (ViT-L/14, ViT-H/14) on described hardware: the same resolver
`--dry-run` runs, checked against the model-state accounting recomputed in test_plan.py and the
activation estimate of benchmarks/plans.py (no activation checkpointing: the plan has none yet)."""
import dataclasses

import pytest

from benchmarks import plans
from engine.data.text import ClipTokenizer
from engine.models.two_tower import TwoTower, count_parameters
from engine.objectives.method import lookup
from engine.plan.dials import Dials
from tests.unit.test_plan import (A100_40GB_X4, ALL_FUSED, H100_X8, LADDER, V100_X1, assert_lowest_fitting_rung,
                                  plan_for, states_per_device)

LARGE = ("vit-l-14", "vit-h-14")
NODES_64 = dataclasses.replace(H100_X8, world_size=512, nodes=64)
H100_X1 = dataclasses.replace(H100_X8, world_size=1, local_world_size=1)
# The "80 GB" (an H100 reports 85.0e9 bytes): estimates must fit the smaller figure.
EIGHTY_GB = 80 * 10**9
_PARAMS = {}


def n_params(model: str) -> int:
    if model not in _PARAMS:
        tokenizer = ClipTokenizer()
        _PARAMS[model] = count_parameters(lookup("clip", model).preset, tokenizer.eot_id, tokenizer.sot_id)
    return _PARAMS[model]


def large_plan(hw, model, method="clip", **dials):
    return plan_for(hw, Dials(method=method, model=model, **dials), n_params=n_params(model), support=ALL_FUSED)


def rung(plan) -> int:
    """How far up the ZeRO ladder a plan is: 0 without ZeRO, then LADDER's rungs."""
    return 0 if plan.zero_stage == 0 else 1 + LADDER.index((plan.zero_stage, plan.offload_optimizer))


@pytest.mark.parametrize("hw", [H100_X1, H100_X8, NODES_64], ids=["1xH100", "8xH100", "64x8xH100"])
@pytest.mark.parametrize("global_batch", [None, 32_768])
@pytest.mark.parametrize("method", ["clip", "declip"])
@pytest.mark.parametrize("model", LARGE)
def test_the_plan_on_80gb_gpus_is_bf16_at_the_lowest_fitting_stage_and_its_memory_fits(hw, global_batch, method,
                                                                                          model):
    plan = large_plan(hw, model, method, global_batch=global_batch)
    assert plan.precision == "bf16" and not plan.offload_optimizer
    if hw.world_size == 1:  # one rank in bf16: fp32 weights under autocast, nothing to partition
        assert plan.zero_stage == 0
    else:
        assert_lowest_fitting_rung(plan, hw)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.global_batch
    if plan.zero_stage == 0:  # fp32 weights, gradients, Adam's m and v, and autocast's bf16 copies
        states = (4 + 4 + 8 + 2) * plan.n_params
    else:
        states = states_per_device(plan.n_params, plan.precision, plan.zero_stage, plan.offload_optimizer,
                                   hw.world_size)
    activations = plan.micro_batch * plans.activation_bytes_per_sample(method, model, plans.calibration())
    assert states + activations <= EIGHTY_GB, (plan.micro_batch, states / 1e9, activations / 1e9)


@pytest.mark.parametrize("model", LARGE)
def test_the_anchor_is_the_largest_power_of_two_whose_estimate_fits_beside_declip_on_one_node(model):
    """The micro-batch anchor of an 80 GB GPU is neither too large (DeCLIP's two views of it fit
    beside the model states of a node of 8) nor needlessly small (twice it would not fit)."""
    anchor = lookup("declip", model).recipe.micro_batch_80gb
    states = states_per_device(n_params(model), "bf16", 1, False, H100_X8.world_size)
    per_sample = plans.activation_bytes_per_sample("declip", model, plans.calibration())
    assert states + anchor * per_sample <= EIGHTY_GB
    assert states + 2 * anchor * per_sample > EIGHTY_GB


@pytest.mark.parametrize("hw", [H100_X1, H100_X8, NODES_64,
                                A100_40GB_X4, V100_X1], ids=lambda hw: f"{hw.world_size}x{hw.device_name}")
def test_vit_h_needs_at_least_vit_ls_memory_settings_and_no_larger_micro_batch(hw):
    vit_b, vit_l, vit_h = (plan_for(hw, Dials(model=m, global_batch=32_768), n_params=n_params(m), support=ALL_FUSED)
                           for m in ("vit-b-32", *LARGE))
    assert rung(vit_b) <= rung(vit_l) <= rung(vit_h)
    assert vit_b.micro_batch >= vit_l.micro_batch >= vit_h.micro_batch


def test_vit_h_on_one_16gb_v100_offloads_where_vit_l_does_not():
    # fp16 keeps ZeRO-1 on one rank; 16 bytes a parameter: ViT-L's 6.8 GB fit half of 16 GiB,
    # ViT-H's 15.8 GB do not, and only offloading the Adam states (4 bytes a parameter) does.
    assert (large_plan(V100_X1, "vit-l-14").zero_stage, large_plan(V100_X1, "vit-l-14").offload_optimizer) == (1, False)
    vit_h = large_plan(V100_X1, "vit-h-14")
    assert (vit_h.zero_stage, vit_h.offload_optimizer) == (3, True) and vit_h.optimizer == "deepspeed_cpu_adam"


def _saved_bytes(tower, example, tokens: int) -> int:
    """Bytes autograd keeps for one sample's backward through `tower` (built on the meta device,
    bf16): every saved tensor once, by its base, less the weights and the tokens x tokens
    attention scores that the meta device's unfused attention keeps and a GPU's fused one does not."""
    import torch

    weights = {id(p) for p in tower.parameters()}
    saved = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights and base.shape[-2:] != (tokens, tokens):
            saved[id(base)] = base.numel() * base.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        tower(example)
    return sum(saved.values())


def test_the_activation_formula_scales_with_the_towers_as_autograd_saves_them():
    """The estimate is scaled from ViT-B/32 to the large presets by the layer formula: that holds
    only if what autograd saves grows as the formula does. Counted on the meta device (nothing
    allocated), the ratio of saved bytes to the formula is the same, within 5%, for each tower."""
    import torch

    tokenizer = ClipTokenizer()
    ratios = {}
    for model in ("vit-b-32", *LARGE):
        preset = lookup("clip", model).preset
        (image_tokens, *image), (text_tokens, *text) = plans.tower_shapes(preset)
        with torch.device("meta"):
            towers = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id).to(torch.bfloat16)
        image_example = torch.zeros(1, 3, preset.image_size, preset.image_size, dtype=torch.bfloat16)
        text_example = torch.zeros(1, preset.context_length, dtype=torch.long)
        for name, tower, example, tokens, (width, layers) in (
                ("image", towers.image, image_example, image_tokens, image),
                ("text", towers.text, text_example, text_tokens, text)):
            formula = plans.LAYER_BYTES_PER_TOKEN_WIDTH * tokens * width * layers
            ratios[model, name] = _saved_bytes(tower, example.to("meta"), tokens) / formula
    for model in LARGE:
        for name in ("image", "text"):
            assert ratios[model, name] == pytest.approx(ratios["vit-b-32", name], rel=0.05), ratios
