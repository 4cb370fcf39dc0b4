"""--format open_clip: a folder that open_clip loads with its `local-dir:` schema, no download:

  open_clip_config.json       {"model_cfg": ..., "preprocess_cfg": ...}
  open_clip_model.safetensors the state dict of open_clip's own CLIP class

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")

(open_clip 3.x, factory.py: `parse_model_name` reads the schema; `create_model` takes
model_cfg and preprocess_cfg from OUT/open_clip_config.json and the weights from the folder,
open_clip_model.safetensors first, loaded strictly; `get_tokenizer` builds its SimpleTokenizer,
CLIP's BPE, at text_cfg's context length.)

The towers are open_clip's native ones, not its timm wrapper: VisionTransformer (conv1,
class_embedding, positional_embedding, ln_pre, resblocks with nn.MultiheadAttention, ln_post,
proj) and the text transformer (token_embedding, positional_embedding, resblocks, ln_final,
text_projection) under a causal mask, with nn.GELU as both our towers use.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from engine.data.dali import CLIP_MEAN, CLIP_STD
from engine.export.clip_layout import Block, ClipTowers
from engine.export.verify import Encoders

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def _block(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    # nn.MultiheadAttention keeps q, k and v stacked in one in_proj, in that order.
    return {
        f"{prefix}.ln_1.weight": block.ln_1[0], f"{prefix}.ln_1.bias": block.ln_1[1],
        f"{prefix}.attn.in_proj_weight": torch.cat([block.q[0], block.k[0], block.v[0]]),
        f"{prefix}.attn.in_proj_bias": torch.cat([block.q[1], block.k[1], block.v[1]]),
        f"{prefix}.attn.out_proj.weight": block.out[0], f"{prefix}.attn.out_proj.bias": block.out[1],
        f"{prefix}.ln_2.weight": block.ln_2[0], f"{prefix}.ln_2.bias": block.ln_2[1],
        f"{prefix}.mlp.c_fc.weight": block.fc_1[0], f"{prefix}.mlp.c_fc.bias": block.fc_1[1],
        f"{prefix}.mlp.c_proj.weight": block.fc_2[0], f"{prefix}.mlp.c_proj.bias": block.fc_2[1],
    }


def state_dict(towers: ClipTowers) -> dict[str, torch.Tensor]:
    """open_clip's CLIP names: the image tower under visual.*, the text tower's parts at the top."""
    vision, text = towers.vision, towers.text
    state = {
        "visual.conv1.weight": vision.patch_conv,
        "visual.class_embedding": vision.class_embedding,
        "visual.positional_embedding": vision.positions,
        "visual.ln_pre.weight": vision.ln_pre[0], "visual.ln_pre.bias": vision.ln_pre[1],
        "visual.ln_post.weight": vision.ln_post[0], "visual.ln_post.bias": vision.ln_post[1],
        # open_clip multiplies `pooled @ proj`: [width, embed], the transpose of nn.Linear's weight.
        "visual.proj": vision.projection.T,
        "token_embedding.weight": text.token_embedding,
        "positional_embedding": text.positions,
        "ln_final.weight": text.ln_final[0], "ln_final.bias": text.ln_final[1],
        "text_projection": text.projection.T,
        "logit_scale": torch.tensor(towers.logit_scale),
    }
    for i, block in enumerate(vision.blocks):
        state.update(_block(f"visual.transformer.resblocks.{i}", block))
    for i, block in enumerate(text.blocks):
        state.update(_block(f"transformer.resblocks.{i}", block))
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def towers_from_state(state: dict[str, torch.Tensor], like: ClipTowers) -> ClipTowers:
    """The inverse of state_dict: open_clip's tensors in CLIP's layout. Sizes that are no tensor's
    (heads, image size, norm eps, token ids) come from `like`, the towers of the model to start;
    the caller has checked that the names and shapes are those state_dict(like) has."""
    def block(prefix: str) -> Block:
        def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"]
        q, k, v = state[f"{prefix}.attn.in_proj_weight"].chunk(3)
        q_bias, k_bias, v_bias = state[f"{prefix}.attn.in_proj_bias"].chunk(3)
        return Block(ln_1=pair("ln_1"), q=(q, q_bias), k=(k, k_bias), v=(v, v_bias), out=pair("attn.out_proj"),
                     ln_2=pair("ln_2"), fc_1=pair("mlp.c_fc"), fc_2=pair("mlp.c_proj"))

    vision = replace(
        like.vision, patch_conv=state["visual.conv1.weight"], class_embedding=state["visual.class_embedding"],
        positions=state["visual.positional_embedding"],
        ln_pre=(state["visual.ln_pre.weight"], state["visual.ln_pre.bias"]),
        ln_post=(state["visual.ln_post.weight"], state["visual.ln_post.bias"]), projection=state["visual.proj"].T,
        blocks=[block(f"visual.transformer.resblocks.{i}") for i in range(len(like.vision.blocks))])
    text = replace(
        like.text, token_embedding=state["token_embedding.weight"], positions=state["positional_embedding"],
        ln_final=(state["ln_final.weight"], state["ln_final.bias"]), projection=state["text_projection"].T,
        blocks=[block(f"transformer.resblocks.{i}") for i in range(len(like.text.blocks))])
    return replace(like, vision=vision, text=text, logit_scale=float(state["logit_scale"]))


def model_config(towers: ClipTowers) -> dict:
    vision, text = towers.vision, towers.text
    return {
        "embed_dim": towers.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
            "layers": len(vision.blocks), "head_width": vision.width // vision.heads,
            "mlp_ratio": vision.mlp_width / vision.width, "norm_kwargs": {"eps": vision.norm_eps},
        },
        "text_cfg": {
            "context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
            "heads": text.heads, "layers": len(text.blocks), "mlp_ratio": text.mlp_width / text.width,
            "norm_kwargs": {"eps": text.norm_eps},
            # Pool at the first end-of-text token, as our tower does. open_clip's default, the
            # argmax over ids, finds the same token only while no id exceeds it: DeCLIP's
            # vocabulary adds a mask token (49408) after it.
            "pool_type": "eos", "eos_id": text.eot_id, "pad_id": 0,
        },
    }


def preprocess_config(towers: ClipTowers) -> dict:
    """open_clip's eval transform at the model's size. It resizes the shorter side to the crop
    size itself; training's evaluations resized to 256/224 of it first (model_card.json)."""
    return {"size": towers.vision.image_size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def write(towers: ClipTowers, folder: Path) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(
        {"model_cfg": model_config(towers), "preprocess_cfg": preprocess_config(towers)}, indent=2) + "\n")
    save_file(state_dict(towers), str(folder / WEIGHTS_FILE))


def load(folder: Path) -> Encoders:
    """The export as an open_clip user gets it, through the local-dir: schema."""
    name = f"local-dir:{folder}"
    model, _, _ = open_clip.create_model_and_transforms(name)   # strict: a missing tensor raises
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)

    def encode_text(captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(captions), normalize=True)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(images, normalize=True)

    return Encoders(f"open_clip {open_clip.__version__}", encode_image, encode_text,
                    float(model.logit_scale.detach().exp()))


def how_to_load(out: Path) -> str:
    name = f"local-dir:{out}"
    return (f"import open_clip\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms({name!r})\n"
            f"tokenizer = open_clip.get_tokenizer({name!r})")
