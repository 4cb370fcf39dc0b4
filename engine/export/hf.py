"""--format hf: a folder that `transformers.CLIPModel.from_pretrained(OUT)` and
`transformers.CLIPProcessor.from_pretrained(OUT)` load, with no download.

  config.json + model.safetensors   CLIPModel (vision_model, text_model, the two projections, logit_scale)
  preprocessor_config.json          CLIPImageProcessor: the eval transform training's evaluations used
  vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                    CLIP's BPE, written from open_clip's bundled vocabulary

Our text tower already is transformers' CLIPTextModelWithProjection, so its tensors keep their
names; the image tower is timm's CLIP ViT, whose fused qkv is split into q/k/v here.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.export.clip_layout import Block, ClipTowers
from engine.export.verify import Encoders

# transformers' names for CLIP's special tokens (open_clip's vocabulary calls them
# <start_of_text> and <end_of_text>; the ids are the same, 49406 and 49407).
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Padding with the end-of-text token, as OpenAI's CLIP uploads to the Hub pad. ClipTokenizer pads
# with id 0, but that id is the BPE token "!": declared a special token, it would be split out of
# the text before BPE and "rotated!" would lose its end-of-word "!</w>" (id 256). Whatever
# follows the first end token cannot reach the pooled output (causal attention, pooling at that
# token), so the embeddings are the same.
PAD = EOT


def _block(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    parts = {"layer_norm1": block.ln_1, "self_attn.q_proj": block.q, "self_attn.k_proj": block.k,
             "self_attn.v_proj": block.v, "self_attn.out_proj": block.out, "layer_norm2": block.ln_2,
             "mlp.fc1": block.fc_1, "mlp.fc2": block.fc_2}
    state = {}
    for name, (weight, bias) in parts.items():
        state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"] = weight, bias
    return state


def _norm(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": pair[0], f"{name}.bias": pair[1]}


def state_dict(towers: ClipTowers) -> dict[str, torch.Tensor]:
    """CLIPModel's tensor names for our weights."""
    vision, text = towers.vision, towers.text
    state = {
        "vision_model.embeddings.class_embedding": vision.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": vision.patch_conv,
        "vision_model.embeddings.position_embedding.weight": vision.positions,
        **_norm("vision_model.pre_layrnorm", vision.ln_pre),   # sic: transformers' spelling
        **_norm("vision_model.post_layernorm", vision.ln_post),
        "visual_projection.weight": vision.projection,
        "text_model.embeddings.token_embedding.weight": text.token_embedding,
        "text_model.embeddings.position_embedding.weight": text.positions,
        **_norm("text_model.final_layer_norm", text.ln_final),
        "text_projection.weight": text.projection,
        "logit_scale": torch.tensor(towers.logit_scale),
    }
    for i, block in enumerate(vision.blocks):
        state.update(_block(f"vision_model.encoder.layers.{i}", block))
    for i, block in enumerate(text.blocks):
        state.update(_block(f"text_model.encoder.layers.{i}", block))
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def towers_from_state(state: dict[str, torch.Tensor], like: ClipTowers) -> ClipTowers:
    """The inverse of state_dict: CLIPModel's tensors in CLIP's layout. Sizes that are no tensor's
    come from `like`, the towers of the model to start; the caller has checked that the names and
    shapes are those state_dict(like) has."""
    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return state[f"{name}.weight"], state[f"{name}.bias"]

    def block(prefix: str) -> Block:
        return Block(ln_1=pair(f"{prefix}.layer_norm1"), q=pair(f"{prefix}.self_attn.q_proj"),
                     k=pair(f"{prefix}.self_attn.k_proj"), v=pair(f"{prefix}.self_attn.v_proj"),
                     out=pair(f"{prefix}.self_attn.out_proj"), ln_2=pair(f"{prefix}.layer_norm2"),
                     fc_1=pair(f"{prefix}.mlp.fc1"), fc_2=pair(f"{prefix}.mlp.fc2"))

    vision = replace(
        like.vision, class_embedding=state["vision_model.embeddings.class_embedding"],
        patch_conv=state["vision_model.embeddings.patch_embedding.weight"],
        positions=state["vision_model.embeddings.position_embedding.weight"],
        ln_pre=pair("vision_model.pre_layrnorm"), ln_post=pair("vision_model.post_layernorm"),
        projection=state["visual_projection.weight"],
        blocks=[block(f"vision_model.encoder.layers.{i}") for i in range(len(like.vision.blocks))])
    text = replace(
        like.text, token_embedding=state["text_model.embeddings.token_embedding.weight"],
        positions=state["text_model.embeddings.position_embedding.weight"],
        ln_final=pair("text_model.final_layer_norm"), projection=state["text_projection.weight"],
        blocks=[block(f"text_model.encoder.layers.{i}") for i in range(len(like.text.blocks))])
    return replace(like, vision=vision, text=text, logit_scale=float(state["logit_scale"]))


def config(towers: ClipTowers):
    vision, text = towers.vision, towers.text
    text_config = dict(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=text.mlp_width,
        num_hidden_layers=len(text.blocks), num_attention_heads=text.heads,
        max_position_embeddings=text.context_length, projection_dim=towers.embed_dim, hidden_act="gelu",
        layer_norm_eps=text.norm_eps,
        # Pooling reads the first end-of-text token: transformers does so when eos_token_id is
        # not its legacy 2 (then it takes the argmax id, which DeCLIP's mask token would break).
        eos_token_id=text.eot_id, bos_token_id=text.sot_id, pad_token_id=0)
    vision_config = dict(
        hidden_size=vision.width, intermediate_size=vision.mlp_width, num_hidden_layers=len(vision.blocks),
        num_attention_heads=vision.heads, image_size=vision.image_size, patch_size=vision.patch_size,
        num_channels=3, projection_dim=towers.embed_dim, hidden_act="gelu", layer_norm_eps=vision.norm_eps)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=towers.embed_dim,
                      logit_scale_init_value=towers.logit_scale)


def write_tokenizer(folder: Path, context_length: int) -> None:
    """CLIP's BPE as transformers reads it: vocab.json (token -> id) and merges.txt (ranked
    pairs under a version line, which transformers skips), from open_clip's bundled file."""
    bpe = SimpleTokenizer()
    renamed = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {renamed.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    # The fast tokenizer built from these files writes tokenizer.json too, so AutoTokenizer needs no
    # conversion at load time; model_max_length lets truncation=True cut at the context.
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                                  bos_token=SOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
                                  model_max_length=context_length)
    tokenizer.save_pretrained(str(folder))


def write_image_processor(folder: Path, image_size: int) -> None:
    """engine/data/cpu_pipeline.eval_pipeline's transform: shorter side to image_size*256/224 (bicubic),
    centre crop, CLIP's mean and std."""
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": round(image_size * 256 / 224)}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    ).save_pretrained(str(folder))


def write(towers: ClipTowers, folder: Path) -> None:
    config(towers).save_pretrained(str(folder))
    # transformers refuses a safetensors file whose metadata does not name its framework.
    save_file(state_dict(towers), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder, towers.text.context_length)
    write_image_processor(folder, towers.vision.image_size)


def load(folder: Path) -> Encoders:
    """The export as a transformers user gets it: CLIPModel and AutoTokenizer from the folder."""
    model, info = CLIPModel.from_pretrained(str(folder), output_loading_info=True)
    # from_pretrained fills a missing tensor with random values and only warns: refuse instead.
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"transformers loaded {folder} with {problems}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def encode_text(captions: list[str]) -> torch.Tensor:
        tokens = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(model.get_text_features(**tokens), dim=-1)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(model.get_image_features(pixel_values=images), dim=-1)

    return Encoders(f"transformers {transformers.__version__}", encode_image, encode_text,
                    float(model.logit_scale.detach().exp()))


def how_to_load(out: Path) -> str:
    return (f"from transformers import CLIPModel, CLIPProcessor\n"
            f"model = CLIPModel.from_pretrained({str(out)!r})\n"
            f"processor = CLIPProcessor.from_pretrained({str(out)!r})")
