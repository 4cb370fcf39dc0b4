"""The planner on simulated hardware: every rule, every override, every UserError."""
import dataclasses
import json
import math

import pytest

from engine.errors import UserError
from engine.plan.hardware import Hardware, probe
from engine.plan.dials import Dials
from engine.plan.memory import MODEL_STATE_BUDGET_FRACTION, REFERENCE_DEVICE_BYTES
from engine.plan.optimizer import OptimizerSupport, probe_optimizer_support
from engine.plan.resolve import resolve
from engine.objectives.method import lookup

GIB = 2**30
H100_X8 = Hardware("cuda", "NVIDIA H100 80GB HBM3", 80 * GIB, (9, 0), True,
                   world_size=8, local_world_size=8, nodes=1, cpus_per_node=64)
V100_X1 = Hardware("cuda", "Tesla V100-SXM2-16GB", 16 * GIB, (7, 0), False,
                   world_size=1, local_world_size=1, nodes=1, cpus_per_node=8)
A100_40GB_X4 = Hardware("cuda", "NVIDIA A100-SXM4-40GB", 40 * GIB, (8, 0), True,
                        world_size=4, local_world_size=4, nodes=1, cpus_per_node=32)
CPU_ONLY = Hardware("cpu", "cpu", 8 * GIB, None, True,   # a CPU without native bf16
                    world_size=1, local_world_size=1, nodes=1, cpus_per_node=2)
ALL_FUSED = OptimizerSupport(apex_fused=True, deepspeed_fused=True, torch_fused=True)
NO_FUSED = OptimizerSupport(apex_fused=False, deepspeed_fused=False, torch_fused=False)

VIT_B32_PARAMS = 151_000_000
VIT_L_PARAMS = 428_000_000      # ViT-L/14 image tower + CLIP text tower
# (stage, offload) from cheapest to most partitioned, as the rule climbs it.
LADDER = [(1, False), (2, False), (3, False), (3, True)]


def plan_for(hw, dials=None, *, n_params=None, dataset_size=None, support=None, **dial_values):
    """A plan for CLIP ViT-B/32 on YFCC15M on a GPU, or the debug smoke run on a CPU."""
    dials = dials or Dials(model="vit-b-32" if hw.accelerator == "cuda" else "debug", **dial_values)
    debug = dials.model == "debug"
    n_params = n_params or (500_000 if debug else VIT_B32_PARAMS)
    dataset_size = dataset_size or (1_500 if debug else 15_000_000)
    support = support or (ALL_FUSED if hw.accelerator == "cuda" else NO_FUSED)
    return resolve(dials, hw, lookup(dials.method, dials.model), n_params=n_params,
                   dataset_size=dataset_size, optimizer_support=support,
                   image_size=32 if dials.model == "debug" else 224)


def states_per_device(n_params, precision, stage, offload, world_size):
    """ZeRO's accounting, recomputed: 2- or 4-byte weights, gradients of the same width except
    bf16's under ZeRO, accumulated in fp32; 12 bytes of Adam state (fp32 master, m, v); stage 1
    splits the Adam states, 2 also gradients, 3 weights."""
    width = 4 if precision == "fp32" else 2
    weights = n_params * width / (world_size if stage == 3 else 1)
    grads = n_params * (4 if precision == "bf16" and stage >= 1 else width) / (world_size if stage >= 2 else 1)
    adam_bytes = 8 if stage == 0 and precision == "fp32" else 12  # no master copy of fp32 weights
    adam = 0 if offload else n_params * adam_bytes / (world_size if stage >= 1 else 1)
    return weights + grads + adam


def assert_lowest_fitting_rung(plan, hw):
    budget = hw.device_memory_bytes * MODEL_STATE_BUDGET_FRACTION
    chosen = LADDER.index((plan.zero_stage, plan.offload_optimizer))
    assert states_per_device(plan.n_params, plan.precision, *LADDER[chosen], hw.world_size) <= budget
    for rung in LADDER[:chosen]:
        assert states_per_device(plan.n_params, plan.precision, *rung, hw.world_size) > budget


SCENARIOS = [H100_X8, V100_X1, A100_40GB_X4, CPU_ONLY]


@pytest.mark.parametrize("hw", SCENARIOS, ids=lambda hw: hw.device_name)
def test_every_field_has_one_decision_with_its_value_and_a_reason(hw):
    plan = plan_for(hw)
    fields = [f.name for f in dataclasses.fields(plan) if f.name not in ("objective_options", "decisions")]
    assert [d.name for d in plan.decisions] == fields + list(plan.objective_options)
    for decision in plan.decisions:
        value = plan.objective_options[decision.name] if decision.name in plan.objective_options \
            else getattr(plan, decision.name)
        assert value == decision.value
        assert decision.reason.strip()


@pytest.mark.parametrize("hw", SCENARIOS, ids=lambda hw: hw.device_name)
@pytest.mark.parametrize("global_batch", [None, 64, 96, 1024, 4000])
def test_batch_arithmetic_always_holds(hw, global_batch):
    plan = plan_for(hw, global_batch=global_batch, dataset_size=15_000_000)
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.global_batch


def test_h100_node_trains_bf16_stage1_with_the_fastest_optimizer():
    plan = plan_for(H100_X8)
    assert plan.precision == "bf16" and "sm_90" in reason(plan, "precision")
    assert (plan.zero_stage, plan.offload_optimizer) == (1, False)
    assert plan.optimizer == "apex_fused"
    assert plan.decode_device == "gpu"
    assert_lowest_fitting_rung(plan, H100_X8)


@pytest.mark.parametrize("support, expected", [
    (OptimizerSupport(apex_fused=False, deepspeed_fused=True, torch_fused=True), "deepspeed_fused"),
    # compilable but not prebuilt: not worth minutes of compiling at every fresh start
    (OptimizerSupport(apex_fused=False, deepspeed_fused=True, torch_fused=True, deepspeed_fused_prebuilt=False),
     "torch_fused"),
    (OptimizerSupport(apex_fused=False, deepspeed_fused=False, torch_fused=True), "torch_fused"),
    (NO_FUSED, "torch"),
])
def test_optimizer_falls_back_in_order(support, expected):
    assert plan_for(H100_X8, support=support).optimizer == expected


@pytest.mark.parametrize("hw", [H100_X8, A100_40GB_X4, V100_X1], ids=lambda hw: hw.device_name)
@pytest.mark.parametrize("precision", [None, "fp32"])
def test_micro_batch_is_the_largest_divisor_within_the_memory_scaled_cap(hw, precision):
    plan = plan_for(hw, precision=precision, activation_checkpointing="off")  # with it: test_plan_checkpointing.py
    recipe = lookup("clip", "vit-b-32").recipe
    cap = recipe.micro_batch_80gb * hw.device_memory_bytes / REFERENCE_DEVICE_BYTES
    cap = max(1, int(cap / 2 if plan.precision == "fp32" else cap))
    per_rank = plan.global_batch // plan.world_size
    assert plan.micro_batch <= cap and per_rank % plan.micro_batch == 0
    assert not [d for d in range(plan.micro_batch + 1, cap + 1) if per_rank % d == 0]


def test_v100_trains_fp16_with_dynamic_loss_scaling():
    plan = plan_for(V100_X1)
    assert plan.precision == "fp16"
    assert "dynamic loss scaling" in reason(plan, "precision")
    assert not plan.offload_optimizer


def test_v100_offloads_a_model_that_does_not_fit_one_device():
    plan = plan_for(V100_X1, n_params=1_500_000_000)
    assert plan.offload_optimizer and plan.optimizer == "deepspeed_cpu_adam"
    assert_lowest_fitting_rung(plan, V100_X1)


@pytest.mark.parametrize("n_params", [VIT_L_PARAMS, 3_000_000_000, 5_000_000_000, 8_000_000_000])
def test_a100_stage_is_the_lowest_whose_model_states_fit(n_params):
    assert_lowest_fitting_rung(plan_for(A100_40GB_X4, n_params=n_params), A100_40GB_X4)


@pytest.mark.parametrize("rung", LADDER)
@pytest.mark.parametrize("side", [0.99, 1.01])
def test_the_stage_switches_where_recomputed_model_states_cross_the_budget(rung, side):
    budget = A100_40GB_X4.device_memory_bytes * MODEL_STATE_BUDGET_FRACTION
    n_params = int(side * budget / states_per_device(1, "bf16", *rung, A100_40GB_X4.world_size))
    if side > 1 and rung == LADDER[-1]:
        with pytest.raises(UserError, match="more devices"):
            plan_for(A100_40GB_X4, n_params=n_params)
    else:
        assert_lowest_fitting_rung(plan_for(A100_40GB_X4, n_params=n_params), A100_40GB_X4)


def test_a100_vit_l_stays_at_stage_1_and_a_much_larger_model_moves_up():
    vit_l = plan_for(A100_40GB_X4, Dials(model="vit_large_patch14_clip_224"), n_params=VIT_L_PARAMS)
    assert (vit_l.zero_stage, vit_l.offload_optimizer) == (1, False)
    assert "optimizer partitioning" in reason(vit_l, "zero_stage")
    larger = [plan_for(A100_40GB_X4, n_params=n) for n in (5_000_000_000, 8_000_000_000)]
    assert all((p.zero_stage, p.offload_optimizer) != (1, False) for p in larger)
    assert larger[-1].offload_optimizer and larger[-1].optimizer == "deepspeed_cpu_adam"


def test_model_too_large_even_with_offload_is_refused():
    with pytest.raises(UserError, match="more devices or a smaller --model"):
        plan_for(V100_X1, n_params=20_000_000_000)


def test_one_cpu_rank_is_fp32_without_zero_fused_adamw_and_dali_cpu():
    plan = plan_for(CPU_ONLY, support=probe_optimizer_support(CPU_ONLY))
    assert plan.precision == "fp32"
    assert (plan.zero_stage, plan.offload_optimizer) == (0, False)
    assert "nothing to partition" in reason(plan, "zero_stage")
    assert plan.optimizer == "torch_fused" and "CPU kernel" in reason(plan, "optimizer")
    assert plan.decode_device == "cpu"
    assert (plan.micro_batch, plan.grad_accum) == (plan.global_batch // plan.world_size, 1)


@pytest.mark.parametrize("hw, dials, stage", [
    (dataclasses.replace(CPU_ONLY, world_size=2, local_world_size=2), {}, 1),  # states to partition
    (dataclasses.replace(H100_X8, world_size=1, local_world_size=1), {}, 0),   # bf16: fp32 weights, autocast
    (dataclasses.replace(H100_X8, world_size=1, local_world_size=1), {"precision": "fp32"}, 0),
    (V100_X1, {}, 1),                                                          # fp16: DeepSpeed's loss scaling
    (CPU_ONLY, {"zero_stage": 1}, 1),
])
def test_only_one_rank_in_fp32_or_bf16_runs_without_zero(hw, dials, stage):
    assert plan_for(hw, **dials).zero_stage == stage


def test_without_zero_in_fp32_there_is_no_master_copy_to_count():
    one_gpu = dataclasses.replace(H100_X8, world_size=1, local_world_size=1)
    fp32 = plan_for(one_gpu, precision="fp32", n_params=VIT_L_PARAMS)
    budget = one_gpu.device_memory_bytes * MODEL_STATE_BUDGET_FRACTION
    assert f"{(4 + 4 + 8) * VIT_L_PARAMS / 1e9:.3g} of {budget / 1e9:.3g} GB" in reason(fp32, "zero_stage")
    # Too large for one device without ZeRO: the ladder goes on to ZeRO with offload.
    larger = plan_for(one_gpu, precision="fp32", n_params=3_000_000_000)
    assert (larger.zero_stage, larger.offload_optimizer) == (3, True)


@pytest.mark.parametrize("hw, dial, value", [
    (H100_X8, "micro_batch", 64), (H100_X8, "precision", "fp32"), (V100_X1, "precision", "fp32"),
    (H100_X8, "zero_stage", 2), (H100_X8, "zero_stage", 0), (H100_X8, "offload", True),
    (H100_X8, "optimizer", "torch"), (H100_X8, "lr", 1e-3), (H100_X8, "warmup_steps", 500),
    (H100_X8, "workers", 3), (H100_X8, "decode_device", "cpu"), (CPU_ONLY, "decode_device", "cpu"),
    (H100_X8, "checkpoint_every", 250), (H100_X8, "eval_every", 100), (H100_X8, "log_every", 50),
    (H100_X8, "steps", 2000),
    (H100_X8, "global_batch", 1024),
])
def test_overrides_win_and_say_given(hw, dial, value):
    plan = plan_for(hw, **{dial: value})
    field = {"offload": "offload_optimizer", "steps": "total_steps"}.get(dial, dial)
    assert getattr(plan, field) == value
    assert "given" in reason(plan, field)


def test_offload_alone_picks_the_cheapest_stage_that_fits_and_cpu_adam():
    plan = plan_for(H100_X8, offload=True)
    assert plan.zero_stage == 1 and plan.optimizer == "deepspeed_cpu_adam"


@pytest.mark.parametrize("offload", [True, False])
def test_stage_and_offload_given_together_are_both_kept(offload):
    for n_params in (VIT_B32_PARAMS, 8_000_000_000):
        plan = plan_for(A100_40GB_X4, n_params=n_params, zero_stage=2, offload=offload)
        assert (plan.zero_stage, plan.offload_optimizer) == (2, offload)


def test_a_stage_given_alone_adds_offload_only_when_needed():
    assert not plan_for(A100_40GB_X4, zero_stage=2).offload_optimizer
    assert plan_for(A100_40GB_X4, n_params=8_000_000_000, zero_stage=2).offload_optimizer


def test_lr_scales_linearly_with_global_batch():
    recipe = lookup("clip", "vit-b-32").recipe
    assert plan_for(H100_X8).lr == recipe.lr
    half = plan_for(H100_X8, global_batch=recipe.global_batch // 2)
    assert half.lr == pytest.approx(recipe.lr / 2)
    assert "scaled linearly" in reason(half, "lr")
    assert plan_for(H100_X8, global_batch=1024, lr=3e-4).lr == 3e-4


def test_run_length_from_epochs_and_effective_epochs():
    plan = plan_for(H100_X8, epochs=2.5, dataset_size=1_000_003)
    steps_per_epoch = 1_000_003 // plan.global_batch  # the loader's epoch: whole optimizer steps
    assert plan.total_steps == math.ceil(2.5 * steps_per_epoch)
    assert plan.epochs == pytest.approx(plan.total_steps / steps_per_epoch)


@pytest.mark.parametrize("dataset_size, global_batch, epochs", [(1_497, 128, 10), (1_497, 96, 3), (1_000, 100, 2),
                                                                (10_000, 100, 1.1)])  # 1.1 x 100 is not 111 steps
def test_epochs_are_counted_in_the_loaders_whole_steps(dataset_size, global_batch, epochs):
    # 1,497 pairs at batch 128 are 11 whole steps an epoch (the loader leaves 89 out of each),
    # not 11.7: 10 epochs are 110 steps, and the plan says 10 epochs, not 9.4.
    plan = plan_for(CPU_ONLY, dataset_size=dataset_size, global_batch=global_batch, epochs=epochs)
    assert plan.total_steps == round(epochs * (dataset_size // global_batch))
    assert plan.epochs == pytest.approx(epochs)
    assert f"leaves out the last {dataset_size % global_batch:,}" in reason(plan, "epochs")


def test_warmup_is_the_recipes_but_at_most_10_percent_of_a_short_run():
    recipe = lookup("clip", "vit-b-32").recipe
    long_run = plan_for(H100_X8, steps=recipe.warmup_steps * 20)
    assert long_run.warmup_steps == recipe.warmup_steps
    short_run = plan_for(H100_X8, steps=recipe.warmup_steps * 2)
    assert short_run.warmup_steps <= short_run.total_steps // 10
    assert "10%" in reason(short_run, "warmup_steps")


@pytest.mark.parametrize("cpus, local", [(64, 8), (256, 8), (2, 2), (2, 1), (12, 4)])
def test_workers_leave_one_core_per_rank_within_1_to_8(cpus, local):
    hw = dataclasses.replace(H100_X8, cpus_per_node=cpus, local_world_size=local)
    assert plan_for(hw).workers == min(8, max(1, cpus // local - 1))


@pytest.mark.parametrize("steps", [1, 7, 40, 352, 5_000, 120_000])
def test_cadences_fit_the_run(steps):
    plan = plan_for(H100_X8, steps=steps)
    assert 1 <= plan.checkpoint_every <= min(1000, steps)
    assert steps <= 1000 or steps / plan.checkpoint_every >= 5 or plan.checkpoint_every == 1000
    assert 1 <= plan.eval_every <= steps and (steps / plan.eval_every > 3 or plan.eval_every == 1)
    assert 1 <= plan.log_every <= min(10, steps)


def test_table_and_dict_show_every_decision():
    plan = plan_for(H100_X8)
    table = plan.table()
    for decision in plan.decisions:
        if decision.value is None and decision.name in ("momentum", "staging_dir", "init", "lock"):
            assert f"\n{decision.name} " not in table  # options this run does not have
        else:
            assert decision.name in table and decision.reason in table
    saved = json.loads(json.dumps(plan.to_dict()))
    assert saved["micro_batch"] == plan.micro_batch
    assert len(saved["decisions"]) == len(plan.decisions)


@pytest.mark.parametrize("hw, dials, fix", [
    (dataclasses.replace(H100_X8, world_size=3), dict(global_batch=100),
     "--global-batch 100 is not divisible by 3 ranks: use a multiple of 3"),
    (dataclasses.replace(H100_X8, world_size=3), {}, "multiple of 3"),
    (H100_X8, dict(micro_batch=48), "use one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512"),
    (V100_X1, dict(precision="bf16"), "--precision fp16"),
    (CPU_ONLY, dict(precision="fp16"), "--precision bf16 or fp32"),
    (H100_X8, dict(precision="fp8"), "bf16, fp16, fp32"),
    (H100_X8, dict(zero_stage=4), "0, 1, 2 or 3"),
    (H100_X8, dict(zero_stage=0, offload=True), "drop --zero-stage 0 or --offload"),
    (CPU_ONLY, dict(offload=True), "drop --offload"),
    (H100_X8, dict(optimizer="adamw"), "deepspeed_cpu_adam"),
    (H100_X8, dict(offload=True, optimizer="torch"), "--optimizer deepspeed_cpu_adam"),
    (H100_X8, dict(optimizer="deepspeed_cpu_adam"), "needs --offload"),
    (CPU_ONLY, dict(optimizer="torch_fused"), "use one of torch"),
    (H100_X8, dict(steps=100, epochs=2.0), "give only one"),
    (H100_X8, dict(steps=100, warmup_steps=100), "--warmup-steps"),
    (H100_X8, dict(epochs=0.0), "--epochs"),
    (H100_X8, dict(lr=-1.0), "--lr"),
    (CPU_ONLY, dict(decode_device="gpu"), "--decode-device cpu"),
    (H100_X8, dict(checkpoint_every=0), "--checkpoint-every"),
])
def test_bad_dials_fail_naming_the_fix(hw, dials, fix):
    with pytest.raises(UserError) as error:
        plan_for(hw, **dials)
    assert fix in str(error.value)


def test_a_compilable_deepspeed_fused_adam_is_taken_when_asked_for():
    support = OptimizerSupport(apex_fused=False, deepspeed_fused=True, torch_fused=True, deepspeed_fused_prebuilt=False)
    assert plan_for(H100_X8, support=support, optimizer="deepspeed_fused").optimizer == "deepspeed_fused"


def test_unsupported_optimizer_override_is_refused():
    support = OptimizerSupport(apex_fused=False, deepspeed_fused=True, torch_fused=True)
    with pytest.raises(UserError, match="cannot run here"):
        plan_for(H100_X8, support=support, optimizer="apex_fused")


def test_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(UserError, match="--global-batch"):
        plan_for(H100_X8, dataset_size=1000)


@pytest.mark.parametrize("method, model, known", [("declipp", "vit-b-32", "clip"),
                                                  ("clip", "vit-b-99", "vit-b-32")])
def test_unknown_method_or_model_lists_the_known_ones(method, model, known):
    with pytest.raises(UserError, match=known):
        lookup(method, model).recipe


@pytest.mark.parametrize("model, vit", [("vit-b-32", True), ("vit-b-16", True), ("rn50", False),
                                        ("vit_small_patch16_224", True), ("resnet18", False)])
def test_recipe_adam_settings_follow_the_tower_family(model, vit):
    recipe, vit_recipe, resnet_recipe = (lookup("clip", m).recipe for m in (model, "vit-b-32", "rn50"))
    expected = vit_recipe if vit else resnet_recipe
    assert (recipe.betas, recipe.eps) == (expected.betas, expected.eps)
    assert vit_recipe.betas != resnet_recipe.betas
    assert "DeCLIP" in recipe.source


@pytest.mark.parametrize("env, expected", [
    ({}, (1, 1, 1)),
    ({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, (16, 8, 2)),  # torchrun
    ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_SIZE": "4"}, (8, 4, 2)),          # deepspeed launcher
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "12", "SLURM_STEP_TASKS_PER_NODE": "4(x3)",
      "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NODELIST": "n[1-3]", "SLURM_LOCALID": "1",
      "SLURM_JOB_ID": "77"}, (12, 4, 3)),                                      # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}, (1, 1, 1)),  # batch script, no srun
])
def test_probe_reads_ranks_from_the_launcher(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS",
                 "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_CPUS_ON_NODE", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NUM_NODES",
                 "SLURM_STEP_NODELIST", "SLURM_LOCALID", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hw = probe()
    assert (hw.world_size, hw.local_world_size, hw.nodes) == expected
    assert hw.cpus_per_node >= 1 and hw.device_memory_bytes > 0


def test_probe_rejects_a_malformed_launcher_variable(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        probe()


def reason(plan, name):
    return next(d.reason for d in plan.decisions if d.name == name)


def test_profile_is_off_by_default_and_must_fit_in_the_run():
    assert plan_for(CPU_ONLY, global_batch=64, steps=10).profile_steps == 0
    assert plan_for(CPU_ONLY, global_batch=64, steps=10, profile=8).profile_steps == 8   # steps 3..10
    with pytest.raises(UserError, match="--profile 9: the trace starts at step 3 of this 10-step run; use --profile 8"):
        plan_for(CPU_ONLY, global_batch=64, steps=10, profile=9)
    with pytest.raises(UserError, match="--profile 0 must be at least 1"):
        plan_for(CPU_ONLY, global_batch=64, steps=10, profile=0)


def test_wandb_is_off_by_default_and_takes_a_project_name_wandb_accepts():
    assert plan_for(CPU_ONLY, global_batch=64, steps=10).wandb_project is None
    plan = plan_for(CPU_ONLY, global_batch=64, steps=10, wandb="clip-runs")
    assert plan.wandb_project == "clip-runs" and "RUN/wandb_run_id" in reason(plan, "wandb_project")
    [row] = [line for line in plan.table().splitlines() if line.startswith("wandb_project ")]
    assert row.split(" | ")[1].strip() == "clip-runs"
    with pytest.raises(UserError, match="--wandb 'team/clip': a W&B project name"):
        plan_for(CPU_ONLY, global_batch=64, steps=10, wandb="team/clip")
