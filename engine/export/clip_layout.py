"""A trained TwoTower read as CLIP's two native towers, the parts both open_clip and Hugging
Face build their CLIP from: a ViT (patch conv, class token, positions, pre-norm, pre-norm
blocks, final norm on the class token, bias-free projection) and CLIP's causal text
transformer pooled at the end-of-text token.

Each exporter (hf.py, openclip.py) only names these parts its library's way. A model that does
not have this layout (a ResNet or another timm family, CLIP-Lite's BERT tower and critic
projections) is refused here, with the reason and the format that always works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from engine.errors import UserError
from engine.models.two_tower import TwoTower

# The presets whose towers have the layout, named in the refusal.
MAPPED_PRESETS = ("vit-debug", "vit-b-32", "vit-b-16", "vit-l-14", "vit-h-14")


class NotClipLayout(UserError):
    """The run's towers have no counterpart among the library's native CLIP towers."""

    def __init__(self, fmt: str, why: str):
        super().__init__(
            f"--format {fmt} writes CLIP's native towers, which this model does not have: {why}. "
            f"The formats open_clip and hf take a timm CLIP-layout ViT with a linear projection and CLIP's "
            f"text transformer: presets {', '.join(MAPPED_PRESETS)} with a method that keeps that text tower. "
            f"Use --format safetensors (any model): model.safetensors + model_card.json, loaded back with "
            f"engine.export.plain.load_exported(OUT).")


@dataclass(frozen=True)
class Block:
    """One pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). Linear weights in
    torch's [out, in] layout; (weight, bias) pairs."""
    ln_1: tuple[torch.Tensor, torch.Tensor]
    q: tuple[torch.Tensor, torch.Tensor]
    k: tuple[torch.Tensor, torch.Tensor]
    v: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc_1: tuple[torch.Tensor, torch.Tensor]
    fc_2: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class VisionTower:
    image_size: int
    patch_size: int
    width: int
    heads: int
    mlp_width: int
    norm_eps: float
    patch_conv: torch.Tensor                   # [width, 3, patch, patch], no bias
    class_embedding: torch.Tensor              # [width]
    positions: torch.Tensor                    # [1 + patches, width], the class token's first
    ln_pre: tuple[torch.Tensor, torch.Tensor]
    blocks: list[Block]
    ln_post: tuple[torch.Tensor, torch.Tensor]  # applied to the class token
    projection: torch.Tensor                   # [embed_dim, width] (nn.Linear layout)


@dataclass(frozen=True)
class TextTower:
    vocab_size: int
    context_length: int
    width: int
    heads: int
    mlp_width: int
    norm_eps: float
    sot_id: int
    eot_id: int                                # pooling reads the first position holding it
    token_embedding: torch.Tensor              # [vocab, width]
    positions: torch.Tensor                    # [context, width]
    blocks: list[Block]
    ln_final: tuple[torch.Tensor, torch.Tensor]
    projection: torch.Tensor                   # [embed_dim, width] (nn.Linear layout)


@dataclass(frozen=True)
class ClipTowers:
    embed_dim: int
    vision: VisionTower
    text: TextTower
    # exp(t) clamped as training used it (CLIP: at 100): the libraries apply exp(t) unclamped,
    # so the exported t is the log of the scale training's logits saw.
    logit_scale: float


def _pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight.detach().clone(), module.bias.detach().clone()


def _vit_problem(trunk: nn.Module) -> str | None:
    """Why a timm image trunk is not CLIP's ViT, or None when it is."""
    if not isinstance(trunk, VisionTransformer):
        return f"its image tower is a timm {type(trunk).__name__}, not a ViT"
    if trunk.cls_token is None or trunk.num_prefix_tokens != 1 or trunk.no_embed_class or trunk.pos_embed is None:
        return "its ViT has no single class token with learned positions (CLIP's ViT has one)"
    if trunk.global_pool != "token" or not isinstance(trunk.fc_norm, nn.Identity) or trunk.attn_pool is not None:
        return f"its ViT pools by {trunk.global_pool!r}, CLIP's reads the class token"
    if not isinstance(trunk.norm_pre, nn.LayerNorm) or not isinstance(trunk.norm, nn.LayerNorm):
        return "its ViT lacks CLIP's LayerNorm before the blocks and after them"
    patch = trunk.patch_embed
    overlapping = patch.proj.kernel_size != patch.proj.stride
    if patch.proj.bias is not None or overlapping or not isinstance(patch.norm, nn.Identity):
        return "its patch embedding is not CLIP's bias-free patch convolution"
    if getattr(trunk, "dynamic_img_size", False):
        return "its ViT resizes its positions at run time"
    for block in trunk.blocks:
        if type(block) is not TimmBlock:
            return f"its ViT blocks are timm's {type(block).__name__}, not the plain pre-norm block CLIP's are"
        if type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            return f"its blocks hold {type(block.attn).__name__} and {type(block.mlp).__name__}, not plain ones"
        if not all(isinstance(m, nn.Identity) for m in (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm,
                                                        block.attn.norm, block.mlp.norm)):
            return "its ViT blocks carry layer scale or extra norms that CLIP's blocks have not"
        if block.attn.qkv.bias is None:
            return "its attention has no q/k/v bias (CLIP's has)"
        if type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none":
            return f"its MLP's activation is {block.mlp.act}, not GELU (QuickGELU towers are not mapped)"
    norms = [m for m in trunk.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) != 1:
        return "its LayerNorms differ in eps"
    return None


def _vision(trunk: nn.Module, projection: nn.Linear) -> VisionTower:
    heads = trunk.blocks[0].attn.num_heads
    blocks = []
    for block in trunk.blocks:
        # timm's fused qkv stacks q, k, v along the output dimension, in that order.
        q, k, v = block.attn.qkv.weight.detach().chunk(3)
        qb, kb, vb = block.attn.qkv.bias.detach().chunk(3)
        blocks.append(Block(
            ln_1=_pair(block.norm1), q=(q.clone(), qb.clone()), k=(k.clone(), kb.clone()),
            v=(v.clone(), vb.clone()), out=_pair(block.attn.proj), ln_2=_pair(block.norm2),
            fc_1=_pair(block.mlp.fc1), fc_2=_pair(block.mlp.fc2)))
    return VisionTower(
        image_size=int(trunk.patch_embed.img_size[0]), patch_size=int(trunk.patch_embed.patch_size[0]),
        width=trunk.embed_dim, heads=heads, mlp_width=trunk.blocks[0].mlp.fc1.out_features,
        norm_eps=trunk.norm.eps, patch_conv=trunk.patch_embed.proj.weight.detach().clone(),
        class_embedding=trunk.cls_token.detach().reshape(-1).clone(),
        positions=trunk.pos_embed.detach()[0].clone(), ln_pre=_pair(trunk.norm_pre), blocks=blocks,
        ln_post=_pair(trunk.norm), projection=projection.weight.detach().clone())


def _text(text_tower: nn.Module, sot_id: int) -> TextTower:
    clip_text = text_tower.transformer           # transformers' CLIPTextModelWithProjection
    config = clip_text.config
    model = clip_text.text_model
    blocks = []
    for layer in model.encoder.layers:
        attn = layer.self_attn
        blocks.append(Block(
            ln_1=_pair(layer.layer_norm1), q=_pair(attn.q_proj), k=_pair(attn.k_proj), v=_pair(attn.v_proj),
            out=_pair(attn.out_proj), ln_2=_pair(layer.layer_norm2), fc_1=_pair(layer.mlp.fc1),
            fc_2=_pair(layer.mlp.fc2)))
    return TextTower(
        vocab_size=config.vocab_size, context_length=config.max_position_embeddings, width=config.hidden_size,
        heads=config.num_attention_heads, mlp_width=config.intermediate_size, norm_eps=config.layer_norm_eps,
        sot_id=sot_id, eot_id=text_tower.eot_id,
        token_embedding=model.embeddings.token_embedding.weight.detach().clone(),
        positions=model.embeddings.position_embedding.weight.detach().clone(), blocks=blocks,
        ln_final=_pair(model.final_layer_norm), projection=clip_text.text_projection.weight.detach().clone())


def layout_problem(model: TwoTower) -> str | None:
    """Why the model's towers are not CLIP's native ones, or None when both are (reads module
    types and flags only: works on a model built on the meta device)."""
    problem = _vit_problem(model.image.trunk)
    if problem:
        return problem
    projection = model.image.proj
    if not isinstance(projection, nn.Linear) or projection.bias is not None:
        return (f"its image features reach the embedding through {type(projection).__name__}, "
                f"not CLIP's bias-free linear projection")
    if model.text.kind != "clip":
        return f"its text tower is the {model.text.kind!r} kind, not CLIP's causal transformer"
    if model.text.transformer.config.hidden_act != "gelu":
        return f"its text tower's activation is {model.text.transformer.config.hidden_act}, not GELU"
    return None


def clip_towers(model: TwoTower, fmt: str) -> ClipTowers:
    """The model's weights in CLIP's layout, or NotClipLayout naming what does not fit `fmt`."""
    problem = layout_problem(model)
    if problem:
        raise NotClipLayout(fmt, problem)
    log_scale = model.logit_scale.log_scale.detach()
    log_scale = 0.0 if log_scale.is_meta else float(log_scale)  # meta: the names and shapes are wanted
    if model.logit_scale.max_scale is not None:
        log_scale = min(log_scale, math.log(model.logit_scale.max_scale))
    sot_id = model.text.transformer.config.bos_token_id
    return ClipTowers(embed_dim=model.embed_dim, vision=_vision(model.image.trunk, model.image.proj),
                      text=_text(model.text, sot_id), logit_scale=log_scale)


def _set_pair(module: nn.Module, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    module.weight.copy_(pair[0])
    module.bias.copy_(pair[1])


@torch.no_grad()
def load_towers(model: TwoTower, towers: ClipTowers) -> None:
    """Copy `towers` into `model`, the inverse of clip_towers: `clip_towers(model)` then gives
    back the same tensors. The model has CLIP's layout and the towers' shapes (the caller checks)."""
    trunk, vision = model.image.trunk, towers.vision
    trunk.patch_embed.proj.weight.copy_(vision.patch_conv)
    trunk.cls_token.copy_(vision.class_embedding.reshape(trunk.cls_token.shape))
    trunk.pos_embed.copy_(vision.positions.reshape(trunk.pos_embed.shape))
    _set_pair(trunk.norm_pre, vision.ln_pre)
    _set_pair(trunk.norm, vision.ln_post)
    model.image.proj.weight.copy_(vision.projection)
    for block, source in zip(trunk.blocks, vision.blocks, strict=True):
        block.attn.qkv.weight.copy_(torch.cat([source.q[0], source.k[0], source.v[0]]))
        block.attn.qkv.bias.copy_(torch.cat([source.q[1], source.k[1], source.v[1]]))
        for module, pair in ((block.norm1, source.ln_1), (block.attn.proj, source.out), (block.norm2, source.ln_2),
                             (block.mlp.fc1, source.fc_1), (block.mlp.fc2, source.fc_2)):
            _set_pair(module, pair)
    clip_text, text = model.text.transformer, towers.text
    embeddings = clip_text.text_model.embeddings
    embeddings.token_embedding.weight.copy_(text.token_embedding)
    embeddings.position_embedding.weight.copy_(text.positions)
    _set_pair(clip_text.text_model.final_layer_norm, text.ln_final)
    clip_text.text_projection.weight.copy_(text.projection)
    for layer, source in zip(clip_text.text_model.encoder.layers, text.blocks, strict=True):
        attn = layer.self_attn
        for module, pair in ((layer.layer_norm1, source.ln_1), (attn.q_proj, source.q), (attn.k_proj, source.k),
                             (attn.v_proj, source.v), (attn.out_proj, source.out), (layer.layer_norm2, source.ln_2),
                             (layer.mlp.fc1, source.fc_1), (layer.mlp.fc2, source.fc_2)):
            _set_pair(module, pair)
    model.logit_scale.log_scale.fill_(towers.logit_scale)
