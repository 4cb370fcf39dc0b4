"""The planner's method-specific decisions: the recipes and options each objective declares
(DeCLIP's and CLIP-Lite's papers), read through the objective's declarations."""
import pytest

from engine.errors import UserError
from engine.plan.dials import Dials
from engine.plan.resolve import resolve
from engine.objectives.method import lookup
from tests.unit.test_plan import ALL_FUSED, CPU_ONLY, H100_X8, NO_FUSED

YFCC15M, COCO = 15_000_000, 591_753


OPTION_NAMES = ("queue_size", "enqueue", "negatives", "prior")


def plan_for(hw, method, model, *, dataset_size, wordnet="/usr/share/wordnet", **dial_values):
    """`dial_values` may hold objective options by name, as the launcher passes them."""
    options = {k: dial_values.pop(k) for k in OPTION_NAMES if k in dial_values}
    dials = Dials(method=method, model=model, objective_options=options, **dial_values)
    return resolve(dials, hw, lookup(method, model), n_params=150_000_000,
                   dataset_size=dataset_size, optimizer_support=ALL_FUSED if hw is H100_X8 else NO_FUSED,
                   image_size=224 if model != "debug" else 32, text_layers=12, wordnet=wordnet)


@pytest.mark.parametrize("model", ["rn50", "vit-b-32"])
def test_declip_paper_recipe_on_yfcc15m(model):
    # The DeCLIP YFCC15M configs: AdamW (0.9, 0.98) eps 1e-8 wd 0.1, 1e-4 -> 1e-3 over 2,500
    # steps, batch 4,096, 32 epochs, queue 65,536.
    plan = plan_for(H100_X8, "declip", model, dataset_size=YFCC15M)
    assert (plan.global_batch, plan.lr, plan.warmup_start_lr, plan.warmup_steps) == (4096, 1e-3, 1e-4, 2500)
    assert (plan.betas, plan.eps, plan.weight_decay, plan.grad_clip) == ((0.9, 0.98), 1e-8, 0.1, None)
    assert plan.total_steps == 32 * (YFCC15M // 4096)  # 32 epochs of whole steps
    assert plan.objective_options == {"queue_size": 65_536, "enqueue": "global", "eda_synonyms": True}
    assert plan.crop_scale == (0.2, 1.0) and plan.momentum is None
    reasons = {d.name: d.reason for d in plan.decisions}
    assert "paper recipe" in reasons["lr"] and "paper recipe" in reasons["queue_size"]
    table = plan.table()
    assert "queue_size" in table and "negatives" not in table and "momentum" not in table


def test_clip_lite_paper_recipe_on_coco():
    plan = plan_for(H100_X8, "clip-lite", "rn50", dataset_size=COCO)
    assert (plan.global_batch, plan.total_steps, plan.warmup_steps) == (1024, 250_000, 10_000)
    assert plan.optimizer == "sgd_lookahead" and plan.momentum == 0.9
    assert dict(plan.group_lrs) == {"image": 0.2, "text": 1e-3, "heads": 1e-3}
    assert (plan.weight_decay, plan.grad_clip, plan.betas, plan.eps) == (1e-4, 10.0, None, None)
    assert plan.objective_options == {"negatives": "local", "prior": "cooperative"}
    assert "paper recipe" in {d.name: d.reason for d in plan.decisions}["optimizer"]
    table = plan.table()
    assert "prior" in table and "queue_size" not in table and "betas" not in table


def test_every_lr_of_a_recipe_scales_with_the_global_batch():
    plan = plan_for(H100_X8, "clip-lite", "rn50", dataset_size=COCO, global_batch=512)
    assert plan.lr == pytest.approx(0.1)
    assert dict(plan.group_lrs) == pytest.approx({"image": 0.1, "text": 5e-4, "heads": 5e-4})
    declip = plan_for(H100_X8, "declip", "rn50", dataset_size=YFCC15M, global_batch=2048)
    assert (declip.lr, declip.warmup_start_lr) == pytest.approx((5e-4, 5e-5))


def test_queue_is_capped_by_the_data_and_options_can_be_overridden():
    plan = plan_for(CPU_ONLY, "declip", "debug", dataset_size=300)
    assert plan.objective_options["queue_size"] == 300 and "capped" in {d.name: d.reason for d in plan.decisions}["queue_size"]
    plan = plan_for(CPU_ONLY, "declip", "debug", dataset_size=1500, queue_size=64, enqueue="rank")
    assert (plan.objective_options["queue_size"], plan.objective_options["enqueue"]) == (64, "rank")
    plan = plan_for(CPU_ONLY, "clip-lite", "debug", dataset_size=1500, negatives="global",
                    prior="adversarial")
    assert plan.objective_options == {"negatives": "global", "prior": "adversarial"}
    # As the command line gives it: text, parsed by the option's declared kind.
    plan = plan_for(CPU_ONLY, "declip", "debug", dataset_size=1500, queue_size="64")
    assert plan.objective_options["queue_size"] == 64


def test_missing_wordnet_is_stated_once_in_the_plan():
    plan = plan_for(CPU_ONLY, "declip", "debug", dataset_size=1500, wordnet=None)
    assert plan.objective_options["eda_synonyms"] is False
    assert plan.table().count("wordnet-base") == 1


@pytest.mark.parametrize("method, dial_values, fix", [
    ("clip", dict(queue_size=10), "--queue-size is an option of --method declip"),
    ("clip-lite", dict(enqueue="global"), "--enqueue is an option of --method declip"),
    ("declip", dict(negatives="global"), "--negatives is an option of --method clip-lite"),
    ("declip", dict(enqueue="everywhere"), "use one of global, rank"),
    ("clip-lite", dict(prior="maybe"), "use one of cooperative, adversarial, off"),
    ("declip", dict(queue_size=0), "at least 1"),
    ("declip", dict(queue_size="many"), "--queue-size 'many': not a int"),
    ("siglip", dict(prior="off"), "--prior is an option of --method clip-lite, not siglip"),
    ("clip", dict(optimizer="sgd_lookahead"), "tuned for AdamW"),
    ("clip", dict(data_fraction=0.0), "(0, 1]"),
    ("clip", dict(data_fraction=1.5), "(0, 1]"),
    ("declip", dict(micro_batch=1, global_batch=8), "at least 2 samples per micro-batch"),
    ("clip-lite", dict(micro_batch=1, global_batch=8), "use --micro-batch 8"),
])
def test_bad_method_options_fail_naming_the_fix(method, dial_values, fix):
    with pytest.raises(UserError, match=__import__("re").escape(fix)):
        plan_for(CPU_ONLY, method, "debug", dataset_size=1500, **dial_values)


def test_clip_lite_paper_recipe_refuses_offload_and_adamw():
    with pytest.raises(UserError, match="drop --offload"):
        plan_for(H100_X8, "clip-lite", "rn50", dataset_size=COCO, offload=True)
    with pytest.raises(UserError, match="SGD \\+ Lookahead"):
        plan_for(H100_X8, "clip-lite", "rn50", dataset_size=COCO, optimizer="torch")


def test_clip_lite_smoke_run_takes_adamw_and_says_why():
    plan = plan_for(CPU_ONLY, "clip-lite", "debug", dataset_size=1497)
    assert (plan.optimizer, plan.lr, plan.group_lrs, plan.momentum) == ("torch", 5e-3, (), None)
    assert "SGD + Lookahead does not learn" in {d.name: d.reason for d in plan.decisions}["lr"]


def test_data_fraction_is_shown_with_the_subset_size():
    dials = Dials(method="clip", model="debug", data_fraction=0.1)
    plan = resolve(dials, CPU_ONLY, lookup("clip", "debug"), n_params=1, dataset_size=150,
                   full_dataset_size=1497, optimizer_support=NO_FUSED, image_size=32)
    assert plan.data_fraction == 0.1 and "150 of 1,497 pairs" in plan.table()


@pytest.mark.parametrize("method", ["clip", "declip", "clip-lite"])
def test_accumulation_keeps_the_global_batch_for_every_method(method):
    # 64 per rank on one CPU as micro-batches of 16: the plan caches features, and says why.
    plan = plan_for(CPU_ONLY, method, "debug", dataset_size=1500, global_batch=64, micro_batch=16)
    reasons = {d.name: d.reason for d in plan.decisions}
    assert (plan.grad_accum, plan.accumulation) == (4, "gradcache")
    assert "whole global batch" in reasons["accumulation"]
    plain = plan_for(CPU_ONLY, method, "debug", dataset_size=1500, global_batch=64, micro_batch=16,
                     accumulation="plain")
    assert plain.accumulation == "plain"
    single = plan_for(CPU_ONLY, method, "debug", dataset_size=1500, global_batch=64, micro_batch=64)
    assert (single.grad_accum, single.accumulation) == (1, "plain")
    with pytest.raises(UserError, match="--accumulation 'cached' is unknown"):
        plan_for(CPU_ONLY, method, "debug", dataset_size=1500, global_batch=64, accumulation="cached")
