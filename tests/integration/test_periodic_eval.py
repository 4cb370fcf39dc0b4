"""`--eval` during training: extra sets scored at every evaluation, logged to metrics.jsonl and
TensorBoard as eval/<set>/<metric>. The sets here hold the held-out split's own images (an
ImageFolder written from it, and the MDS itself), so each must score exactly what the run's
held-out evaluation logged at the same step, through other code (engine/eval/benchmark.py);
and the standalone command, one process, must score the final checkpoint as the run logged it.

The run has two ranks at ZeRO-3: every evaluation is split over them (engine/eval/shard.py),
each encoding its block, and a forward one rank skipped would hang the run. The folder's one
broken file lies in rank 1's block, so that rank keeps one image fewer than rank 0."""
import json

from launching import check, launch, read_metrics, tensorboard_scalars
from test_evaluate import evaluate, heldout, write_image_folder

HELD_OUT = ["zeroshot_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1",
            "retrieval_t2i_r5"]


def test_extra_sets_are_scored_at_every_evaluation(cache_env, tmp_path):
    held = heldout(cache_env)
    images = write_image_folder(held, tmp_path / "digits")
    (images / "09" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the last file: left out
    classes = held / "classes.json"
    run = tmp_path / "run"
    result = launch(["--global-batch", "32", "--steps", "4", "--log-every", "2", "--eval-every", "2",
                     "--checkpoint-every", "4", "--eval", f"zeroshot:{images},classnames={classes}",
                     "--eval", f"retrieval:{held}", "--zero-stage", "3", "--out", run], cache_env, ranks=2)
    check(result)
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["zero_stage"], plan["world_size"]) == (3, 2)
    assert "evaluations" in result.stdout and f"zeroshot:{images}" in result.stdout  # a plan row

    evaluations = [row for row in read_metrics(run) if "retrieval_i2t_r1" in row]
    assert [row["step"] for row in evaluations] == [2, 4]
    for row in evaluations:
        assert row["eval/digits/zeroshot_top1"] == row["zeroshot_top1"]
        assert row["eval/digits/zeroshot_top5"] == row["zeroshot_top5"]
        for name in HELD_OUT[2:]:  # the MDS folder is named heldout: the held-out split's TensorBoard name
            assert row[f"eval/heldout-2/{name}"] == row[name]
        assert 0 < row["eval/digits/zeroshot_mean_per_class_recall"] <= 1
    # The comparison can fail: the two evaluations differ.
    assert evaluations[0]["eval/heldout-2/retrieval_i2t_r1"] != evaluations[1]["eval/heldout-2/retrieval_i2t_r1"] \
        or evaluations[0]["eval/digits/zeroshot_top1"] != evaluations[1]["eval/digits/zeroshot_top1"]
    scalars = tensorboard_scalars(run)
    assert scalars["eval/digits/zeroshot_top1"] == [evaluations[0]["eval/digits/zeroshot_top1"],
                                                    evaluations[1]["eval/digits/zeroshot_top1"]]
    for name in HELD_OUT:  # the held-out split's own series, each set in a chart of its own
        assert scalars[f"eval/heldout/{name}"] == [row[name] for row in evaluations]
    assert scalars["eval/heldout-2/retrieval_i2t_r1"] == [row["eval/heldout-2/retrieval_i2t_r1"] for row in evaluations]

    check(evaluate([run, "--task", "zeroshot", "--images", images, "--classnames", classes,
                    "--out", tmp_path / "zs.json"], cache_env))
    written = json.loads((tmp_path / "zs.json").read_text())
    standalone = written["metrics"]
    assert written["counts"]["left_out"] == 1 and written["counts"]["images"] == 300
    assert {k: standalone[k] for k in standalone} == {k: evaluations[1][f"eval/digits/{k}"] for k in standalone}


def test_a_bad_eval_dial_is_refused_before_the_run_starts(cache_env, tmp_path):
    result = launch(["--steps", "2", "--eval", f"zeroshot:{tmp_path / 'nowhere'}", "--out", tmp_path / "run"],
                    cache_env)
    assert result.returncode == 2 and "error: --eval zeroshot:" in result.stderr and "not a directory" in result.stderr
    assert not (tmp_path / "run").exists()
