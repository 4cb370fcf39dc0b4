"""engine/export on random-init models: every tower pair with CLIP's layout round-trips through
transformers and open_clip themselves within 1e-5, the rest is refused with the fallback named,
the exported tokenizer splits text as ClipTokenizer does, and a wrong mapping leaves no OUT."""
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.export import hf, openclip, plain
from engine.export.clip_layout import MAPPED_PRESETS, layout_problem
from engine.export.publish import ExportNotVerified, export
from engine.export.verify import TOLERANCE
from engine.models.presets import PRESETS, ModelPreset, get_preset
from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower

TOKENIZER = ClipTokenizer()


def build(preset: ModelPreset, seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(preset, TOKENIZER.eot_id, TOKENIZER.sot_id).eval()


def leftovers(folder):
    """Anything the export left beside OUT (its hidden staging folder)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["clip", "declip"])   # DeCLIP: one more token, the MLM mask
@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_vit_debug_round_trips_through_the_library(fmt, method, tmp_path):
    preset = lookup(method, "vit-debug").preset
    model = build(preset)
    with torch.no_grad():   # a scale above CLIP's clamp: the export holds the clamped value's log
        model.logit_scale.log_scale.fill_(5.0)
    result = export(model, preset, fmt, tmp_path / "out")
    assert result.agreement.ok and result.agreement.max_diff <= TOLERANCE
    assert result.agreement.logit_scale_rel_diff <= TOLERANCE and float(model.scale().detach()) == 100.0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["format"] == fmt and card["architecture"]["vocab_size"] == preset.vocab_size
    assert card["verification"]["image_max_abs_diff"] <= TOLERANCE
    assert "model_card.json" in result.files and not leftovers(tmp_path)


def test_processor_and_tokenizer_load_as_a_user_loads_them(tmp_path):
    from transformers import CLIPProcessor

    preset = get_preset("vit-debug")
    export(build(preset), preset, "hf", tmp_path / "hf")
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "hf"))
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert processor.tokenizer.model_max_length == preset.context_length

    import open_clip
    export(build(preset), preset, "open_clip", tmp_path / "oc")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    assert torch.equal(tokenizer(["a photo of a 3."]), TOKENIZER(["a photo of a 3."]))
    assert any(type(t).__name__ == "CenterCrop" for t in preprocess.transforms)


def test_vit_b_32_shapes_map_through_both_libraries(tmp_path):
    """ViT-B/32's widths, heads, patches and 224 px, one block per tower to keep it fast: the
    numbers the small preset does not exercise (head width 64, 7x7 patches, text 512 wide)."""
    base = get_preset("vit-b-32")
    preset = replace(base, text_layers=1, image_kwargs=dict(depth=1))
    model = build(preset)
    for fmt in ("hf", "open_clip"):
        assert export(model, preset, fmt, tmp_path / fmt).agreement.ok
    config = json.loads((tmp_path / "open_clip" / "open_clip_config.json").read_text())["model_cfg"]
    assert (config["vision_cfg"]["width"], config["vision_cfg"]["head_width"], config["vision_cfg"]["patch_size"],
            config["vision_cfg"]["image_size"], config["text_cfg"]["width"], config["text_cfg"]["heads"],
            config["embed_dim"]) == (768, 64, 32, 224, 512, 8, 512)


@pytest.mark.parametrize("method", ["clip", "declip", "clip-lite"])
def test_the_presets_the_refusal_names_are_the_ones_that_map(method):
    """Every preset x method, built on the meta device (no memory, no init): CLIP's native
    towers exactly for the presets NotClipLayout lists, trained with CLIP or DeCLIP."""
    mapped = set()
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = TwoTower(lookup(method, name).preset, TOKENIZER.eot_id, TOKENIZER.sot_id)
        if layout_problem(model) is None:
            mapped.add(name)
    assert mapped == (set(MAPPED_PRESETS) if method != "clip-lite" else set())


def _small_non_clip_vit() -> ModelPreset:
    # timm's ImageNet ViT: no LayerNorm before the blocks, unlike CLIP's.
    return ModelPreset(name="vit_tiny_patch16_224", image_tower="vit_tiny_patch16_224", image_size=32,
                       embed_dim=64, text_width=64, text_layers=1, text_heads=2,
                       image_kwargs=dict(img_size=32, patch_size=8, depth=1))


@pytest.mark.parametrize("preset, why", [
    (get_preset("debug"), "timm ResNet, not a ViT"),
    (lookup("clip-lite", "vit-debug").preset, "CriticProjection"),
    (_small_non_clip_vit(), "LayerNorm before the blocks"),
], ids=["debug-resnet", "clip-lite", "imagenet-vit"])
def test_unmappable_models_are_refused_and_the_fallback_exports(preset, why, tmp_path):
    model = build(preset)
    for fmt in ("hf", "open_clip"):
        with pytest.raises(UserError, match=why) as refusal:
            export(model, preset, fmt, tmp_path / fmt)
        message = str(refusal.value)
        assert "--format safetensors" in message and "vit-debug, vit-b-32, vit-b-16" in message
        assert not (tmp_path / fmt).exists()
    result = export(model, preset, "safetensors", tmp_path / "plain")
    assert result.files == ["model.safetensors", "model_card.json"] and result.agreement.ok
    again = plain.load_exported(tmp_path / "plain")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not leftovers(tmp_path)


# CLIP BPE's hard cases: case, punctuation glued to words, contractions, digits, accents,
# non-Latin scripts, emoji, runs of whitespace, and a caption longer than the context.
CAPTIONS = ["a photo of the digit 7.", "A handwritten ZERO, slightly rotated!", "it's 1,000 km/h!!",
            "don't won't I'm we've they'll he'd", "Café crème brûlée", "über-cool naïve façade",
            "emoji 🐶🐱", "日本語のキャプション", "  spaces\tand\nnewlines  ", "hello,world.foo;bar", "",
            " ".join(["a very long caption"] * 40)]


def test_exported_tokenizer_gives_clip_tokenizer_ids_up_to_padding(tmp_path):
    """transformers' CLIPTokenizer (and the fast one AutoTokenizer picks) from the exported
    files: ClipTokenizer's ids up to and including the end token; after it they pad with the
    end token where ClipTokenizer pads with 0, which the pooling never reads. (The fast one
    skips ftfy, as it does for OpenAI's own upload: HTML entities and curly quotes split
    otherwise there; the embedding check uses plain captions.)"""
    from transformers import AutoTokenizer, CLIPTokenizer

    hf.write_tokenizer(tmp_path, 77)
    ours = TOKENIZER(CAPTIONS)
    for tokenizer in (CLIPTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))):
        theirs = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
        for row, caption in enumerate(CAPTIONS):
            end = int((ours[row] == TOKENIZER.eot_id).int().argmax()) + 1
            assert theirs[row, :end].tolist() == ours[row, :end].tolist(), caption
            assert (theirs[row, end:] == TOKENIZER.eot_id).all(), caption
    assert ours[-1, -1] == TOKENIZER.eot_id   # the long caption was cut with its end token kept


def _swap_first_query_and_key(state_dict):
    def broken(towers):
        state = state_dict(towers)
        q, k = (f"vision_model.encoder.layers.0.self_attn.{name}_proj.weight" for name in "qk")
        state[q], state[k] = state[k], state[q]
        return state
    return broken


def _in_proj_in_k_q_v_order(block_of):
    def broken(prefix, block):
        state = block_of(prefix, block)
        q, k, v = state[f"{prefix}.attn.in_proj_weight"].chunk(3)
        state[f"{prefix}.attn.in_proj_weight"] = torch.cat([k, q, v])
        return state
    return broken


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_a_wrong_mapping_is_caught_and_leaves_no_out(fmt, tmp_path, monkeypatch):
    if fmt == "hf":
        monkeypatch.setattr(hf, "state_dict", _swap_first_query_and_key(hf.state_dict))
    else:
        monkeypatch.setattr(openclip, "_block", _in_proj_in_k_q_v_order(openclip._block))
    preset = get_preset("vit-debug")
    with pytest.raises(ExportNotVerified) as failure:
        export(build(preset), preset, fmt, tmp_path / "out")
    assert failure.value.agreement.max_diff > TOLERANCE and "max |difference|" in str(failure.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_an_existing_out_is_refused_unless_forced_then_replaced(tmp_path):
    preset = get_preset("vit-debug")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    with pytest.raises(UserError, match="not empty.*--force"):
        export(build(preset), preset, "open_clip", out)
    assert (out / "keep.txt").exists()
    export(build(preset), preset, "open_clip", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model_card.json", "open_clip_config.json",
                                                    "open_clip_model.safetensors"]
    assert not leftovers(tmp_path)


def test_an_existing_out_is_refused_by_the_launcher_before_the_run_is_read(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "export_launcher", Path(__file__).resolve().parents[2] / "launchers" / "export.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    # The run does not exist either: OUT is checked first, before loading anything.
    assert launcher.main([str(tmp_path / "no-run"), "--format", "hf", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "--force" in err


def test_vit_debug_trains_as_the_other_cpu_preset_does():
    """The smoke-run recipe and CLIP-Lite's debug critic, not ViT-B's 4,096-pair recipe."""
    assert lookup("clip", "vit-debug").recipe.lr == lookup("clip", "debug").recipe.lr
    assert lookup("declip", "vit-debug").recipe.options == lookup("declip", "debug").recipe.options
    lite = lookup("clip-lite", "vit-debug").preset
    assert (lite.text_width, lite.embed_dim) == (lookup("clip-lite", "debug").preset.text_width, 128)
