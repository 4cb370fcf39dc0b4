"""--data mixtures (engine/data/streams.py): the syntax, the proportions an epoch draws, exact resume."""
import io
import json
from collections import Counter
from itertools import islice

import pytest
from PIL import Image
from streaming import MDSWriter

from engine.data.spec import DataSpec
from engine.data.streams import DataSource, data_facts, parse_data
from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.plan.dials import Dials
from engine.plan.resolve import resolve
from engine.plan.resume import check_resumable
from engine.objectives.method import lookup
from tests.unit.test_loader import _assert_same_batches, _loader, _take
from tests.unit.test_plan import CPU_ONLY, NO_FUSED

# ---- syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data, sources", [
    ("/data/pairs", [("/data/pairs", None)]),
    ("s3://bucket/pairs", [("s3://bucket/pairs", None)]),
    ("/data/my,pairs", [("/data/my,pairs", None)]),         # no weights: one path, commas and all
    ("s3://bucket/x:0.7", [("s3://bucket/x", None)]),         # one dataset is the whole epoch
    ("s3://bucket/x:0.7,/data/a:0.3", [("s3://bucket/x", 0.7), ("/data/a", 0.3)]),
    (" gs://b/laion : 7 , relative/cc3m:3 ", [("gs://b/laion", 7.0), ("relative/cc3m", 3.0)]),
    ("hf://datasets/org/x:1e-1,s3://bucket:0.9", [("hf://datasets/org/x", 0.1), ("s3://bucket", 0.9)]),
])
def test_each_location_takes_the_number_after_its_last_colon_as_its_weight(data, sources):
    assert parse_data(data) == tuple(DataSource(location, weight) for location, weight in sources)


@pytest.mark.parametrize("data, message", [
    ("s3://bucket/x:0.7,/data/a", r"/data/a has no weight; in a mixture give each dataset one, e\.g\. s3://"),
    ("/data/a:0.5,,/data/b:0.5", r"\(empty\) has no weight"),
    (":0.5,/data/b:0.5", r"a weight without a dataset before it; write LOCATION:WEIGHT"),
    ("/data/a:0,/data/b:1", r"the weight of /data/a is 0; give each dataset a positive weight"),
    ("/data/a:nan,/data/b:1", r"the weight of /data/a is nan"),
    ("/data/a:0.5,/data/a/:0.5", r"/data/a appears more than once"),
    ("/data/a:x,/data/b:1", r"/data/a:x has no weight \('x' is not a number\)"),
    (" ", r"--data is empty"),
    ("s3://bucket/a,s3://bucket/b", r"2 datasets without weights; a mixture gives each one"),
])
def test_a_malformed_mixture_says_how_to_write_it(data, message):
    with pytest.raises(UserError, match=message):
        parse_data(data)


def test_local_datasets_listed_without_weights_are_called_a_mixture(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="2 datasets without weights"):
        parse_data(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    (tmp_path / "a,b").mkdir()  # a path that holds a comma is one dataset
    assert parse_data(str(tmp_path / "a,b")) == (DataSource(str(tmp_path / "a,b"), None),)


def test_a_weight_that_draws_nothing_in_an_epoch_is_refused(mixture):
    alpha, beta = (item.rpartition(":")[0] for item in mixture.split(","))
    with pytest.raises(UserError, match=r"the weight of .*beta draws no sample in an epoch of 400"):
        data_facts(f"{alpha}:1,{beta}:1e-300", seed=0)


# ---- a mixture read by the loader -----------------------------------------------------------

ALPHA, BETA = 200, 200     # samples of each dataset: alpha's ids are 0..199, beta's 200..399
MICRO_BATCH = 16           # one rank: the 400-sample epoch is 25 whole batches, no tail dropped
TAKE, RESUME_AT = 28, 20   # the batches after the resume point cross into epoch 1


def _write(out, count, color):
    image = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(image, format="PNG")
    # Small shards, so that each dataset spans several and the shuffle mixes them.
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit=4096) as writer:
        for index in range(count):
            writer.write({"jpg": image.getvalue(), "txt": f"{out.name} {index}"})
    return out


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return f"{_write(root / 'alpha', ALPHA, (200, 30, 30))}:0.7,{_write(root / 'beta', BETA, (30, 30, 200))}:0.3"


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def _mixture_loader(data, tokenizer, workers=1):
    return _loader(data, tokenizer, workers=workers, micro_batch=MICRO_BATCH, image_size=16,
                   spec=DataSpec(crop_scale=(0.5, 1.0)), seed=5)


@pytest.fixture(scope="module")
def reference(mixture, tokenizer):
    loader = _mixture_loader(mixture, tokenizer)
    batches, states = [], []
    for batch in islice(iter(loader), TAKE):
        batches.append({k: v.clone() for k, v in batch.items()})
        states.append(loader.state_dict())
    return loader, batches, states


def test_an_epoch_draws_each_dataset_in_its_proportion(reference):
    loader, batches, _ = reference
    epoch = loader.dataset_size
    assert epoch == ALPHA + BETA and loader.batches_per_epoch == 25
    ids = [i for batch in batches[:loader.batches_per_epoch] for i in batch["sample_id"].tolist()]
    drawn = Counter("alpha" if i < ALPHA else "beta" for i in ids)
    # streaming draws floor(epoch x proportion) from each dataset and hands the remainder (fewer
    # samples than datasets) out one each; the loader then drops the epoch's tail that does not
    # fill a global batch. So each count is within 1 + that tail of its share.
    tolerance = 1 + epoch % loader.global_batch
    assert abs(drawn["alpha"] - 0.7 * epoch) <= tolerance and abs(drawn["beta"] - 0.3 * epoch) <= tolerance
    # alpha is drawn 1.4 times over: each of its samples once or twice; beta, drawn below its
    # size, gives a subset without repeats.
    per_sample = Counter(ids)
    assert {per_sample[i] for i in range(ALPHA)} == {1, 2}
    assert all(per_sample[i] == 1 for i in ids if i >= ALPHA)


def test_the_datasets_are_interleaved_not_one_after_the_other(reference):
    _, batches, _ = reference
    mixed = [batch for batch in batches[:25] if 0 < int((batch["sample_id"] < ALPHA).sum()) < MICRO_BATCH]
    assert len(mixed) > 20


def test_mixture_resumes_exactly_mid_epoch_and_across_the_epoch_boundary(reference, mixture, tokenizer):
    _, batches, states = reference
    resumed = _mixture_loader(mixture, tokenizer, workers=0)
    resumed.load_state_dict(json.loads(json.dumps(states[RESUME_AT - 1])))
    _assert_same_batches(_take(resumed, TAKE - RESUME_AT), batches[RESUME_AT:])


def test_other_weights_are_another_order_that_a_run_directory_refuses_to_resume(reference, mixture, tokenizer,
                                                                                tmp_path):
    _, batches, _ = reference
    alpha, beta = (part.rsplit(":", 1)[0] for part in mixture.split(","))
    other = _mixture_loader(f"{alpha}:0.5,{beta}:0.5", tokenizer)
    assert other.dataset_size == ALPHA + BETA  # the epoch's size alone cannot tell the two apart
    assert not _take(other, 1)[0]["sample_id"].equal(batches[0]["sample_id"])

    def plan(data):
        facts = data_facts(data, seed=5)
        return resolve(Dials(data=data, global_batch=16, seed=5), CPU_ONLY, lookup("clip", "debug"),
                       n_params=1000, dataset_size=facts.epoch_size, optimizer_support=NO_FUSED, image_size=32,
                       data=facts)

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    (tmp_path / "plan.json").write_text(json.dumps(plan(mixture).to_dict()))
    check_resumable(tmp_path, plan(mixture), lookup("clip", "debug"))
    with pytest.raises(UserError, match=r"data drawn as \(proportion, samples per epoch\) \[\(0.7, 280\), "
                                        r"\(0.3, 120\)\] but this command gives \[\(0.5, 200\), \(0.5, 200\)\]: resume "
                                        r"with the same --data weights"):
        check_resumable(tmp_path, plan(f"{alpha}:0.5,{beta}:0.5"), lookup("clip", "debug"))
