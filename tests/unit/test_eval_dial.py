"""The `--eval` dial: what it accepts, and that a bad one is refused before a run starts,
saying what to give."""
import io

import pytest
from PIL import Image

from engine.errors import UserError
from engine.eval.benchmark import RetrievalSet, ZeroShotSet
from engine.eval.periodic import open_periodic_evals


def _folder(root, classes=("cat", "dog")):
    for name in classes:
        (root / name).mkdir(parents=True)
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (200, 10, 10)).save(buffer, format="PNG")
        (root / name / "a.png").write_bytes(buffer.getvalue())
    return root


def test_sets_are_opened_with_their_options_and_unique_names(tmp_path):
    a = _folder(tmp_path / "a" / "val")
    b = _folder(tmp_path / "b" / "val")
    (tmp_path / "names.txt").write_text("a cat\na dog\n")
    evals = open_periodic_evals((f"zeroshot:{a},classnames={tmp_path / 'names.txt'},templates=simple",
                                 f"zeroshot:{b}"))
    assert [(e.task, e.name) for e in evals] == [("zeroshot", "val"), ("zeroshot", "val-2")]
    first, second = (e.evaluation.data for e in evals)
    assert isinstance(first, ZeroShotSet) and first.classnames == ["a cat", "a dog"]
    assert len(first.templates) == 7 and len(second.templates) == 80   # open_clip's simple / openai
    assert second.classnames == ["cat", "dog"]                       # the folder names


def test_retrieval_names_the_split(tmp_path):
    mds = tmp_path / "held"
    mds.mkdir()
    (mds / "index.json").write_text("{}")
    (evaluation,) = open_periodic_evals((f"retrieval:{mds}",))
    assert isinstance(evaluation.evaluation.data, RetrievalSet) and evaluation.name == "held"


def test_a_set_named_like_the_held_out_split_is_renamed(tmp_path):
    """TensorBoard shows the held-out split as eval/heldout/ (engine/observe/metrics.py), and the
    built-in data's held-out MDS folder is named heldout: a set of that name keeps apart from it."""
    mds = tmp_path / "heldout"
    mds.mkdir()
    (mds / "index.json").write_text("{}")
    (evaluation,) = open_periodic_evals((f"retrieval:{mds}",))
    assert evaluation.name == "heldout-2"


@pytest.mark.parametrize("spec, message", [
    ("zeroshot", "give --eval zeroshot:DIR"),
    ("classify:/tmp", "give --eval zeroshot:DIR"),
    ("zeroshot:{folder},split=test", "'split=test' is not an option of zeroshot (it takes classnames=..., templates=...)"),
    ("retrieval:{folder}", "a directory must be an MDS dataset"),
    ("zeroshot:{folder}/missing", "not a directory"),
    ("zeroshot:{folder},classnames={names}", "lists 3 class(es) but --images has 2"),
    ("zeroshot:{folder},templates={names}", "needs a {} where the class name goes"),
])
def test_bad_dials_say_what_to_give(tmp_path, spec, message):
    folder = _folder(tmp_path / "val")
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError) as error:
        open_periodic_evals((spec.format(folder=folder, names=tmp_path / "names.txt"),))
    assert message in str(error.value) and str(error.value).startswith("--eval ")
