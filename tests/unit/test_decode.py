"""DALI graphs (real CPU pipelines) against PIL, crop windows, and undecodable images."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.augment import CROP_ASPECT, ViewBatch, random_resized_crop, view_generator
from engine.data.cpu_pipeline import cpu_train_pipeline, eval_pipeline
from engine.data.dali import CLIP_MEAN, CLIP_STD, PLACEHOLDER_PNG, DecodedBatches, HostBatch
from engine.data.train_graph import train_pipeline

CPU = torch.device("cpu")


def _encode(array: np.ndarray, fmt: str) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _pil_decode(encoded: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded.tobytes())).convert("RGB")).astype(np.float64)


def _pixels(chw: torch.Tensor) -> np.ndarray:
    """Undo CLIP normalisation: back to HWC 0..255."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return (chw * std + mean).permute(1, 2, 0).double().numpy()


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: every pixel differs, so a shifted crop cannot match by accident."""
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([(xx + yy) * 127 / (height + width), xx * 255 / width, 255 - yy * 255 / height], -1)
    noise = np.random.default_rng(seed).integers(0, 64, (height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _crop_batch(encoded, anchors, shapes, payload=None) -> HostBatch:
    """A one-view "crop" batch with the given windows."""
    return HostBatch(list(encoded), payload, (ViewBatch(np.asarray(anchors), np.asarray(shapes), {}),))


def _window(width, height, scale, seed, epoch, sample):
    return random_resized_crop(width, height, scale, view_generator(seed, epoch, sample, 0))


@pytest.fixture(params=["single", "split"])
def graph(request) -> str:
    """The CPU training graph: DALI's single graph (the reference, and the GPU's) or the one the
    loader runs on the CPU, cut around a torch resize (engine/data/cpu_pipeline.py)."""
    return request.param


def _run_train(batches, image_size, batch_size, graph, num_threads=2):
    if graph == "split":
        build = lambda source: cpu_train_pipeline(source, batch_size=batch_size, image_size=image_size,
                                                  num_threads=num_threads)
    else:
        build = lambda source: train_pipeline(source, batch_size=batch_size, image_size=image_size,
                                              device="cpu", device_id=None, num_threads=num_threads)
    return [(images, host) for (images,), host in DecodedBatches(iter(batches), build=build, device=CPU)]


def _run_eval(batches, image_size, batch_size):
    build = lambda source: eval_pipeline(source, batch_size=batch_size, image_size=image_size, num_threads=2)
    return [(images, host) for (images,), host in DecodedBatches(iter(batches), build=build, device=CPU)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_decode_equals_pil(fmt):
    # 256 is the eval resize target for 224, so the resize is the identity and only the crop acts.
    encoded = _encode(_picture(256, 256), fmt)
    [(images, _)] = _run_eval([HostBatch(encoded=[encoded], payload=None)], image_size=224, batch_size=4)
    assert images.shape == (1, 3, 224, 224) and images.dtype == torch.float32
    np.testing.assert_allclose(_pixels(images[0]), _pil_decode(encoded)[16:240, 16:240], atol=1e-3)


def test_train_crop_window_equals_pil_crop(graph):
    picture = _picture(40, 50)
    encoded = _encode(picture, "PNG")
    # 30x30 windows at (x, y) = (10, 6) and (20, 10), output 30: no resize, so pixels must match.
    anchors = np.array([[10 / 50, 6 / 40], [20 / 50, 10 / 40]], dtype=np.float32)
    shapes = np.full((2, 2), [30 / 50, 30 / 40], dtype=np.float32)
    batch = _crop_batch([encoded, encoded], anchors, shapes)
    [(windows, _)] = _run_train([batch], image_size=30, batch_size=2, graph=graph)
    assert windows.shape == (2, 3, 30, 30)
    np.testing.assert_allclose(_pixels(windows[0]), picture[6:36, 10:40], atol=1e-3)
    np.testing.assert_allclose(_pixels(windows[1]), picture[10:40, 20:50], atol=1e-3)
    assert not np.allclose(_pixels(windows[0]), picture[6:36, 11:41], atol=1)  # x and y not swapped or shifted


def test_train_pixels_do_not_depend_on_dali_thread_count(graph):
    sizes = [(40, 60), (90, 30), (64, 64), (200, 120)]
    encoded = [_encode(_picture(h, w, seed=i), "JPEG") for i, (h, w) in enumerate(sizes)]
    windows = [_window(w, h, (0.2, 1.0), 0, 0, i) for i, (h, w) in enumerate(sizes)]
    make = lambda: [_crop_batch(encoded, np.stack([a for a, _ in windows]), np.stack([s for _, s in windows]))]
    [(one_thread, _)] = _run_train(make(), image_size=48, batch_size=4, graph=graph, num_threads=1)
    [(three_threads, _)] = _run_train(make(), image_size=48, batch_size=4, graph=graph, num_threads=3)
    assert torch.equal(one_thread, three_threads)


def test_eval_output_shape_for_mixed_sizes_and_short_last_batch():
    sizes = [(40, 60), (90, 30), (64, 64), (33, 47), (200, 120)]
    encoded = [_encode(_picture(h, w, seed=i), "PNG") for i, (h, w) in enumerate(sizes)]
    batches = [HostBatch(encoded=encoded[:3], payload=0), HostBatch(encoded=encoded[3:], payload=1)]
    outputs = _run_eval(batches, image_size=32, batch_size=3)
    assert [tuple(images.shape) for images, _ in outputs] == [(3, 3, 32, 32), (2, 3, 32, 32)]
    assert [host.payload for _, host in outputs] == [0, 1]


def test_crop_window_is_a_function_of_seed_epoch_and_sample():
    window = lambda seed, epoch, sample: np.concatenate(_window(320, 240, (0.3, 1.0), seed, epoch, sample))
    assert np.array_equal(window(1, 0, 7), window(1, 0, 7))
    assert not np.array_equal(window(1, 0, 7), window(1, 0, 8))
    assert not np.array_equal(window(1, 0, 7), window(1, 1, 7))
    assert not np.array_equal(window(1, 0, 7), window(2, 0, 7))


def test_crop_windows_follow_scale_and_aspect():
    width, height, scale = 320, 240, (0.3, 0.9)
    for sample in range(300):
        (x, y), (w, h) = _window(width, height, scale, 5, 0, sample)
        assert 0 <= x and 0 <= y and x + w <= 1 + 1e-6 and y + h <= 1 + 1e-6
        px_w, px_h = w * width, h * height
        assert abs(px_w - round(px_w)) < 1e-3 and abs(x * width - round(x * width)) < 1e-3  # whole pixels
        assert scale[0] - 0.02 <= w * h <= scale[1] + 0.02
        assert CROP_ASPECT[0] - 0.02 <= px_w / px_h <= CROP_ASPECT[1] + 0.02
    # A strip too thin for any allowed aspect falls back to a centred crop at the nearest aspect.
    (x, y), (w, h) = _window(400, 20, (0.9, 1.0), 5, 0, 0)
    assert h == 1 and math.isclose(w * 400, 20 * CROP_ASPECT[1], abs_tol=1) and abs(x * 400 - (1 - w) * 200) <= 1


def test_image_dali_rejects_is_replaced_and_batches_stay_in_order(graph):
    good = [_encode(_picture(32, 32, seed=i), "PNG") for i in range(8)]
    truncated = good[2][: len(good[2]) // 2]  # header intact, so only DALI notices
    assert Image.open(io.BytesIO(truncated.tobytes())).size == (32, 32)
    whole = lambda i: _crop_batch(good[2 * i:2 * i + 2], np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32), i)
    clean = [whole(i) for i in range(4)]
    broken = [whole(i) for i in range(4)]
    broken[1].encoded[0] = truncated  # DALI fails while later batches are already prefetched

    expected = _run_train(clean, image_size=32, batch_size=2, graph=graph)
    outputs = _run_train(broken, image_size=32, batch_size=2, graph=graph)
    assert [host.payload for _, host in outputs] == [0, 1, 2, 3]
    replaced = [host.replaced.tolist() for _, host in outputs]
    assert replaced == [[False, False], [True, False], [False, False], [False, False]]
    for index in (0, 2, 3):
        assert torch.equal(outputs[index][0], expected[index][0])
    assert torch.equal(outputs[1][0][1], expected[1][0][1])
    placeholder = _pixels(outputs[1][0][0])
    flat = np.round(np.array(CLIP_MEAN) * 255)
    np.testing.assert_allclose(placeholder, np.broadcast_to(flat, placeholder.shape), atol=1e-3)
    assert outputs[1][1].encoded[0] is PLACEHOLDER_PNG


def test_load_eval_set_decodes_every_heldout_digit(digits):
    from streaming import LocalDataset

    from engine.data.embedded import CLASSNAMES, PROMPT_TEMPLATES
    from engine.eval.eval_set import load_eval_set

    # image size 28 resizes the 32 px digits' shorter side to round(28 * 256 / 224) = 32 (unchanged)
    # and centre-crops 28, so pixels must equal PIL's decode cropped 2 px from each edge.
    evalset = load_eval_set(digits.heldout, image_size=28)
    stored = LocalDataset(local=str(digits.heldout))
    assert evalset.images.shape == (300, 3, 28, 28) and evalset.images.dtype == torch.float32
    assert evalset.labels.tolist() == [stored[i]["cls"] for i in range(300)]
    assert evalset.captions == [stored[i]["txt"] for i in range(300)]
    assert (evalset.classnames, evalset.templates) == (list(CLASSNAMES), list(PROMPT_TEMPLATES))
    for index in (0, 137, 299):
        expected = _pil_decode(np.frombuffer(stored[index]["jpg"], dtype=np.uint8))[2:30, 2:30]
        np.testing.assert_allclose(_pixels(evalset.images[index]), expected, atol=1e-3)


def test_image_only_the_pipeline_rejects_is_found_by_halving(monkeypatch, graph):
    # nvJPEG can reject an image PIL reads. PIL is made to accept everything here, so that the
    # pipeline itself must say which images it fails on (the truncated PNGs, on the CPU).
    import engine.data.dali as dali
    monkeypatch.setattr(dali, "fully_decodable", lambda encoded: True)
    good = [_encode(_picture(32, 32, seed=i), "PNG") for i in range(16)]
    whole = lambda images, i: _crop_batch(images, np.zeros((8, 2), np.float32), np.ones((8, 2), np.float32), i)
    clean = [whole(good[8 * i:8 * i + 8], i) for i in range(2)]
    broken = [whole(good[8 * i:8 * i + 8], i) for i in range(2)]
    for batch, index in ((0, 3), (0, 6), (1, 7)):
        broken[batch].encoded[index] = good[8 * batch + index][:60]   # truncated: DALI fails on it

    expected = _run_train(clean, image_size=32, batch_size=8, graph=graph)
    outputs = _run_train(broken, image_size=32, batch_size=8, graph=graph)
    assert [host.payload for _, host in outputs] == [0, 1]
    assert [np.flatnonzero(host.replaced).tolist() for _, host in outputs] == [[3, 6], [7]]
    for (images, host), (reference, _) in zip(outputs, expected):
        kept = ~host.replaced
        assert torch.equal(images[torch.from_numpy(kept)], reference[torch.from_numpy(kept)])


def test_a_failure_that_is_no_image_is_raised(monkeypatch, graph):
    # Every image reads and the pipeline still fails (here: a crop window outside any image):
    # nothing is replaced and the error reaches the caller.
    import engine.data.dali as dali
    monkeypatch.setattr(dali, "fully_decodable", lambda encoded: True)
    images = [_encode(_picture(32, 32, seed=i), "PNG") for i in range(2)]
    batch = _crop_batch(images, np.full((2, 2), 2.0, np.float32), np.ones((2, 2), np.float32), 0)
    with pytest.raises(RuntimeError):
        _run_train([batch], image_size=32, batch_size=2, graph=graph)
    assert not batch.replaced.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_gpu_decode_survives_a_broken_jpeg(damage):
    # nvJPEG meets a broken JPEG in a mixed-decode batch: the job goes on, that image becomes the
    # placeholder (found by PIL or, where PIL reads it, by the pipeline itself), the rest decode.
    good = [_encode(_picture(64, 80, seed=i), "JPEG") for i in range(8)]
    broken = good[5].copy()
    if damage == "truncated":
        broken = broken[: len(broken) // 3]
    else:  # header kept, entropy-coded data overwritten
        start = broken.tobytes().find(b"\xff\xda") + 20
        broken[start:-2] = np.random.default_rng(0).integers(0, 256, len(broken) - start - 2, dtype=np.uint8)
    batch = lambda images: _crop_batch(images, np.zeros((8, 2), np.float32), np.ones((8, 2), np.float32), 0)
    build = lambda source: train_pipeline(source, batch_size=8, image_size=32, device="gpu", device_id=0,
                                          num_threads=2)
    gpu = torch.device("cuda", 0)
    [((clean,), _)] = list(DecodedBatches(iter([batch(good)]), build=build, device=gpu))
    [((images,), host)] = list(DecodedBatches(iter([batch([*good[:5], broken, *good[6:]])]), build=build, device=gpu))
    assert not host.replaced[[0, 1, 2, 3, 4, 6, 7]].any()
    # Image 5 is the placeholder, or (nvJPEG may decode a scrambled JPEG as garbage) its pixels.
    others = torch.tensor([i != 5 for i in range(8)], device=gpu)
    assert torch.equal(images[others], clean[others])


def test_whole_decode_gives_the_window_decode_pixels():
    # One view sliced from the whole decoded image (the GPU benchmark's variant) against the
    # window decoded alone: the same crop.
    photos = [_encode(_picture(60, 80, seed=i), "JPEG") for i in range(4)]
    windows = [_window(80, 60, (0.3, 1.0), 0, 0, i) for i in range(4)]
    batch = lambda: _crop_batch(photos, [w[0] for w in windows], [w[1] for w in windows])
    outputs = []
    for whole in (False, True):
        build = lambda source: train_pipeline(source, batch_size=4, image_size=32, device="cpu", device_id=None,
                                              num_threads=2, whole_decode=whole)
        [((images,), _)] = list(DecodedBatches(iter([batch()]), build=build, device=CPU))
        outputs.append(images)
    difference = np.abs(np.stack([_pixels(w) - _pixels(h) for w, h in zip(*outputs)]))   # 0..255
    assert difference.max() < 2   # equal in DALI 2.4 on the CPU
