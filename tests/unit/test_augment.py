"""Image-view augmentations: the Python draws (statistics, determinism) and the DALI graph (real CPU
pipeline) against torchvision's functional transforms."""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from engine.data.augment import (BLUR_SIGMA, PHOTOMETRIC_FIELDS, ViewBatch, ViewDraw, draw_view,
                                 random_resized_crop)
from engine.data.dali import CLIP_MEAN, CLIP_STD, DecodedBatches, HostBatch
from engine.data.spec import DataSpec
from engine.data.train_graph import train_pipeline

CPU = torch.device("cpu")
SIZE = 48  # output side; the source picture is 64 x 80, so the full-image window is a real resize
WHOLE = (np.zeros(2, np.float32), np.ones(2, np.float32))


def _picture() -> np.ndarray:
    """Colour gradients, a saturated square and thin stripes: every jitter step and the blur show."""
    yy, xx = np.mgrid[0:64, 0:80]
    picture = np.stack([xx * 255 / 80, yy * 255 / 64, 128 + 100 * np.sin(xx / 3.0)], -1)
    picture[20:44, 30:60] = (220, 40, 30)
    picture[::6] = 250
    return np.clip(picture, 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _pixels(chw: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation: CHW in 0..1, torchvision's float image convention."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return chw * std + mean


def _decode_views(encoded: np.ndarray, views: list[list[ViewDraw]], augment: str, device: str = "cpu",
                  hw_decoder_load: float | None = None):
    """Run one batch, the given views of one image, through the real training graph: 0..1 pixels per view."""
    batch = HostBatch([encoded] * len(views[0]), None, tuple(ViewBatch.stack(draws, augment) for draws in views))
    build = lambda source: train_pipeline(source, batch_size=len(views[0]), image_size=SIZE, device=device,
                                          device_id=0 if device == "gpu" else None, num_threads=2,
                                          augment=augment, views=len(views), hw_decoder_load=hw_decoder_load)
    torch_device = torch.device("cuda", 0) if device == "gpu" else CPU
    [(outputs, _)] = list(DecodedBatches(iter([batch]), build=build, device=torch_device))
    return [torch.stack([_pixels(image) for image in images.cpu()]) for images in outputs]


def _decode(draws: list[ViewDraw], augment: str) -> torch.Tensor:
    return _decode_views(_png(_picture()), [draws], augment)[0]


# Views of the whole picture, one photometric step each (the others at their identity).
CASES = {
    "identity": ViewDraw(*WHOLE),
    "brightness": ViewDraw(*WHOLE, jitter=(1.3, 1.0, 1.0, 0.0)),
    "contrast": ViewDraw(*WHOLE, jitter=(1.0, 0.6, 1.0, 0.0)),
    "saturation": ViewDraw(*WHOLE, jitter=(1.0, 1.0, 1.4, 0.0)),
    "hue": ViewDraw(*WHOLE, jitter=(1.0, 1.0, 1.0, 0.08)),
    "all": ViewDraw(*WHOLE, jitter=(0.7, 1.3, 0.6, -0.05)),
    "gray": ViewDraw(*WHOLE, gray=True),
    "blur": ViewDraw(*WHOLE, blur_sigma=BLUR_SIGMA[1]),
    "flip": ViewDraw(*WHOLE, flip=True),
}


@pytest.fixture(scope="module")
def decoded() -> dict[str, torch.Tensor]:
    return dict(zip(CASES, _decode(list(CASES.values()), "moco_v2")))


def _torchvision(image: torch.Tensor, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0) -> torch.Tensor:
    """torchvision's ColorJitter steps in our fixed order, on a 0..1 float CHW image."""
    image = TF.adjust_brightness(image, brightness)
    image = TF.adjust_contrast(image, contrast)
    image = TF.adjust_saturation(image, saturation)
    return TF.adjust_hue(image, hue)


@pytest.mark.parametrize("case", ["brightness", "contrast", "saturation", "hue", "all"])
def test_color_jitter_matches_torchvision(decoded, case):
    identity = decoded["identity"]
    expected = _torchvision(identity, *CASES[case].jitter)
    assert (decoded[case] - expected).abs().max() < 1e-4
    assert (decoded[case] - identity).abs().mean() > 0.02  # the step did something


def test_identity_draws_leave_the_resized_picture_unchanged(decoded):
    # The crop-only graph resizes to uint8; the augmenting one keeps floats: they differ by rounding.
    [crop_only] = _decode([ViewDraw(*WHOLE)], "crop")
    assert (decoded["identity"] - crop_only).abs().max() < 0.6 / 255


def test_gray_view_has_equal_channels_holding_the_luma(decoded):
    gray, identity = decoded["gray"], decoded["identity"]
    assert (gray[0] - gray[1]).abs().max() < 1e-5 and (gray[1] - gray[2]).abs().max() < 1e-5
    assert (gray[0] - TF.rgb_to_grayscale(identity)[0]).abs().max() < 1e-3
    assert (identity[0] - identity[1]).abs().max() > 0.2  # the source is colourful


def test_flipped_view_is_the_mirror(decoded):
    assert torch.equal(decoded["flip"], decoded["identity"].flip(-1))


def test_blur_removes_high_frequencies(decoded):
    def detail(image):  # energy of the differences between neighbouring pixels
        return (image.diff(dim=-1) ** 2).mean() + (image.diff(dim=-2) ** 2).mean()

    assert detail(decoded["blur"]) < 0.3 * detail(decoded["identity"])
    assert abs(decoded["blur"].mean() - decoded["identity"].mean()) < 0.02  # blurred, not darkened


def test_two_views_of_one_image_differ_and_repeat():
    spec = DataSpec(image_views=2, augment="moco_v2", crop_scale=(0.2, 1.0))
    draws = [draw_view(80, 64, spec.augment, spec.crop_scale, 3, 0, 5, view) for view in (0, 1, 0)]
    images = _decode(draws, "moco_v2")
    assert torch.equal(images[0], images[2])
    assert (images[0] - images[1]).abs().mean() > 0.05


def test_draws_are_a_function_of_seed_epoch_sample_and_view():
    def draw(seed=1, epoch=0, sample=7, view=0):
        d = draw_view(320, 240, "moco_v2", (0.2, 1.0), seed, epoch, sample, view)
        return np.concatenate([d.anchor, d.shape, list(d.inputs().values())])

    assert np.array_equal(draw(), draw())
    for other in (dict(seed=2), dict(epoch=1), dict(sample=8), dict(view=1)):
        assert not np.array_equal(draw(), draw(**other)), other


def test_first_view_crop_is_the_clip_crop():
    # The loader drew CLIP's windows from (seed, epoch, sample id) before views existed.
    for sample in range(20):
        expected = random_resized_crop(320, 240, (0.5, 1.0), np.random.default_rng((4, 2, sample)))
        for augment in ("crop", "moco_v2"):
            view = draw_view(320, 240, augment, (0.5, 1.0), 4, 2, sample, 0)
            assert np.array_equal(view.anchor, expected[0]) and np.array_equal(view.shape, expected[1])


def test_moco_v2_draw_statistics():
    # 10,000 draws: the standard error of a rate near 0.5 is 0.005, so these bounds are 5 sigma.
    draws = [draw_view(320, 240, "moco_v2", (0.2, 1.0), 0, 0, sample, 0) for sample in range(10_000)]
    rate = lambda flags: float(np.mean(flags))
    jittered = [d.jitter is not None for d in draws]
    gray = [d.gray for d in draws]
    blurred = [d.blur_sigma is not None for d in draws]
    flipped = [d.flip for d in draws]
    assert abs(rate(jittered) - 0.8) < 0.02 and abs(rate(gray) - 0.2) < 0.02
    assert abs(rate(blurred) - 0.5) < 0.025 and abs(rate(flipped) - 0.5) < 0.025
    assert abs(rate(np.logical_and(gray, flipped)) - 0.1) < 0.015  # drawn independently
    factors = np.array([d.jitter for d in draws if d.jitter is not None])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert np.abs(factors[:, 3]).max() <= 0.1 and abs(factors[:, 3].mean()) < 0.003
    sigmas = np.array([d.blur_sigma for d in draws if d.blur_sigma is not None])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.02
    areas = np.array([d.shape.prod() for d in draws])
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1


def test_clip_lite_draws_jitter_only():
    draws = [draw_view(320, 240, "crop_jitter", (0.2, 1.0), 0, 0, sample, 0) for sample in range(2_000)]
    assert abs(np.mean([d.jitter is not None for d in draws]) - 0.8) < 0.045
    assert not any(d.gray or d.flip or d.blur_sigma for d in draws)
    assert set(ViewBatch.stack(draws[:4], "crop_jitter").photometric) == set(PHOTOMETRIC_FIELDS["crop_jitter"])


def test_data_spec_checks_and_batch_keys():
    assert DataSpec().batch_keys == ("image", "text", "sample_id")
    declip = DataSpec(image_views=2, augment="moco_v2", crop_scale=(0.2, 1), text_aug=True, mlm=True)
    assert declip.batch_keys == ("image", "image2", "text", "mlm_labels", "text_aug", "sample_id")
    assert declip.crop_scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="crop scale"):
        DataSpec(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="augment"):
        DataSpec(augment="simclr")
    with pytest.raises(ValueError, match="image_views"):
        DataSpec(image_views=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("augment, views", [("crop", 1), ("crop_jitter", 1), ("moco_v2", 1), ("moco_v2", 2)])
@pytest.mark.parametrize("hw_decoder_load", [None, 0.0, 1.0])   # DALI's default; all CUDA; all hardware
def test_gpu_graph_matches_the_cpu_graph(augment, views, hw_decoder_load):
    # nvJPEG decoding and GPU operators against the CPU pipeline, on a JPEG with drawn views.
    buffer = io.BytesIO()
    Image.fromarray(_picture()).save(buffer, format="JPEG", quality=95)
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    draws = [[draw_view(80, 64, augment, (0.2, 1.0), 0, 0, sample, view) for sample in range(8)]
             for view in range(views)]
    on_gpu = _decode_views(encoded, draws, augment, "gpu", hw_decoder_load)
    on_cpu = _decode_views(encoded, draws, augment)
    for gpu_view, cpu_view in zip(on_gpu, on_cpu):
        difference = (gpu_view - cpu_view).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.15  # decoders and resamplers differ slightly


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_photometric_steps_match_torchvision():
    [decoded] = _decode_views(_png(_picture()), [list(CASES.values())], "moco_v2", "gpu")
    decoded = dict(zip(CASES, decoded))
    identity = decoded["identity"]
    for case in ("brightness", "contrast", "saturation", "hue", "all"):
        assert (decoded[case] - _torchvision(identity, *CASES[case].jitter)).abs().max() < 1e-3, case
    assert (decoded["gray"][0] - decoded["gray"][2]).abs().max() < 1e-5
    assert torch.equal(decoded["flip"], identity.flip(-1))
