"""--init: sources made and saved by open_clip, transformers and timm themselves. The initialised
model encodes as the source library does (1e-5), init then export gives the source's tensors
back bit for bit, and a source of another shape is refused naming the mismatch and the fitting preset."""
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.export import hf, openclip
from engine.export.clip_layout import clip_towers
from engine.export.verify import TOLERANCE, Encoders, compare
from engine.init_weights import check_source, find_source, load_source
from engine.models.presets import get_preset
from engine.models.two_tower import TwoTower

TOKENIZER = ClipTokenizer()
PRESET = get_preset("vit-debug")


def ours(seed: int = 0, preset=PRESET) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(preset, TOKENIZER.eot_id, TOKENIZER.sot_id).eval()


def open_clip_model(seed: int = 1):
    """open_clip's own CLIP at vit-debug's shapes, initialised by open_clip."""
    config = openclip.model_config(clip_towers(ours(), "open_clip"))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config).eval()
    with torch.no_grad():   # away from its initial value, to be sure it is carried
        model.logit_scale.fill_(3.1)
    return model, config


def open_clip_encoders(model) -> Encoders:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE; the context length is the model's

    def encode_text(captions):
        with torch.no_grad():
            return model.encode_text(tokenizer(captions, context_length=PRESET.context_length), normalize=True)

    def encode_image(images):
        with torch.no_grad():
            return model.encode_image(images, normalize=True)

    return Encoders("open_clip", encode_image, encode_text, float(model.logit_scale.detach().exp()))


def started_from(given: str, model_name: str = "vit-debug") -> TwoTower:
    source = find_source(given)
    model = ours(seed=7, preset=get_preset(model_name))
    check_source(source, model, model_name)
    load_source(source, model)
    return model


@pytest.mark.parametrize("form", ["training checkpoint", "local-dir"])
def test_open_clip_source_encodes_as_open_clip_and_exports_back_bit_for_bit(form, tmp_path):
    source_model, config = open_clip_model()
    if form == "training checkpoint":  # as open_clip's training writes epoch_N.pt under DDP
        given = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{n}": t for n, t in
                                                             source_model.state_dict().items()}}, given)
    else:  # open_clip's local-dir: layout, which open_clip itself then loads
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
        save_file(source_model.state_dict(), str(folder / "open_clip_model.safetensors"))
        given = f"local-dir:{folder}"
        source_model = open_clip.create_model(given).eval()
    model = started_from(str(given))
    agreement = compare(model, TOKENIZER, PRESET.image_size, open_clip_encoders(source_model))
    assert agreement.max_diff <= TOLERANCE and agreement.logit_scale_rel_diff <= TOLERANCE, agreement.describe()
    exported = openclip.state_dict(clip_towers(model, "open_clip"))
    source = source_model.state_dict()
    assert set(exported) <= set(source)
    for name, tensor in exported.items():
        assert torch.equal(tensor, source[name]), name


def test_hf_folder_encodes_as_transformers_and_exports_back_bit_for_bit(tmp_path):
    config = hf.config(clip_towers(ours(), "hf"))
    torch.manual_seed(2)
    source_model = CLIPModel(CLIPConfig(**config.to_dict())).eval()
    source_model.save_pretrained(tmp_path / "hf")
    model = started_from(str(tmp_path / "hf"))
    exported = hf.state_dict(clip_towers(model, "hf"))
    source = source_model.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, source[name]), name
    images = torch.randn(3, 3, PRESET.image_size, PRESET.image_size)
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(source_model.get_image_features(pixel_values=images), dim=-1)
        tokens = TOKENIZER(["a photo of a seven", "zero"])
        theirs_text = torch.nn.functional.normalize(source_model.get_text_features(input_ids=tokens), dim=-1)
        assert (model.encode_image(images) - theirs).abs().max() <= TOLERANCE
        assert (model.encode_text(tokens) - theirs_text).abs().max() <= TOLERANCE


def test_timm_weights_start_the_image_tower_only(tmp_path):
    torch.manual_seed(3)
    trunk = timm.create_model(PRESET.image_tower, pretrained=False, num_classes=10, **PRESET.image_kwargs).eval()
    save_file(trunk.state_dict(), str(tmp_path / "timm.safetensors"))   # with its classifier, dropped here
    model = started_from(str(tmp_path / "timm.safetensors"))
    assert find_source(str(tmp_path / "timm.safetensors")).towers == ("image",)
    images = torch.randn(2, 3, PRESET.image_size, PRESET.image_size)
    with torch.no_grad():
        assert torch.equal(model.image.trunk(images), trunk.forward_head(trunk.forward_features(images),
                                                                         pre_logits=True))
    untouched = ours(seed=7)
    for name, tensor in model.text.state_dict().items():
        assert torch.equal(tensor, untouched.text.state_dict()[name]), name


def test_another_shape_is_refused_naming_the_mismatch_and_the_preset_that_fits(tmp_path):
    source_model, _ = open_clip_model()
    torch.save(source_model.state_dict(), tmp_path / "vit_debug.pt")
    with pytest.raises(UserError) as refused:
        started_from(str(tmp_path / "vit_debug.pt"), "vit-b-32")
    assert "visual.conv1.weight is (64, 3, 8, 8) in the source, (768, 3, 32, 32) in this model" in str(refused.value)
    assert "it fits --model vit-debug" in str(refused.value)
    with pytest.raises(UserError, match="CLIP's native towers, which this --model has not"):
        started_from(str(tmp_path / "vit_debug.pt"), "debug")


def test_bad_sources_are_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such file or folder.*nothing is downloaded"):
        find_source(str(tmp_path / "missing.pt"))
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="cannot read it"):
        find_source(str(tmp_path / "torn.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="a folder with none of plan.json"):
        find_source(str(tmp_path / "empty"))
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"hidden_act": "quick_gelu"},
                                                   "vision_config": {"hidden_act": "quick_gelu"}}))
    with pytest.raises(UserError, match="quick_gelu.*use GELU"):
        find_source(str(quick))


def test_a_clipzero_weights_file_starts_every_tower(tmp_path):
    source = ours(seed=5)
    save_file({n: t.contiguous() for n, t in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert find_source(str(tmp_path / "model.safetensors")).kind == "clipzero"
    model = started_from(str(tmp_path / "model.safetensors"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
