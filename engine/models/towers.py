"""Image and text towers, each ending in the shared embedding width. Built from config only.

Each tower returns a `TowerOutput`: the embedding (not yet normalised), the tower's own
pooled features before the projection (CLIP-Lite's prior discriminators read them), and for
text the per-token states (DeCLIP's MLM head reads them).
"""
from dataclasses import replace
from typing import NamedTuple

import timm
import torch
from timm.layers import PatchDropout, PatchDropoutWithIndices
from torch import nn
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModelWithProjection

from engine.models.activation_checkpointing import checkpoint_image_trunk, checkpoint_text_transformer
from engine.models.heads import CriticProjection
from engine.models.presets import ModelPreset


class TowerOutput(NamedTuple):
    embedding: torch.Tensor                  # [B, embed_dim], unnormalised
    features: torch.Tensor                   # [B, tower width], pooled, before the projection
    token_states: torch.Tensor | None = None  # [B, L, text width] (text towers only)


class ImageTower(nn.Module):
    """A timm image model (random init) followed by the projection to the shared embedding."""

    def __init__(self, preset: ModelPreset):
        super().__init__()
        if preset.image_projection == "attention_pool":
            # CLIP's ModifiedResNet: the attention-pool head's output projection is the embedding.
            self.trunk = timm.create_model(preset.image_tower, pretrained=False,
                                           num_classes=preset.embed_dim, **preset.image_kwargs)
            self.proj = nn.Identity()
        else:
            self.trunk = timm.create_model(preset.image_tower, pretrained=False, num_classes=0,
                                           **preset.image_kwargs)
            if preset.image_projection == "critic":
                self.proj = CriticProjection(self.trunk.num_features, preset.embed_dim)
            else:
                # Bias-free, as CLIP's ViT `proj`.
                self.proj = nn.Linear(self.trunk.num_features, preset.embed_dim, bias=False)
        self.feature_dim = self.trunk.num_features

    def checkpoint_activations(self, enabled: bool) -> None:
        """Recompute the trunk's blocks in the backward instead of keeping their activations."""
        checkpoint_image_trunk(self.trunk, enabled)

    def forward(self, images: torch.Tensor) -> TowerOutput:
        features = self.trunk(images)
        return TowerOutput(self.proj(features), features)


# timm's ViT-family towers drop patch tokens (FLIP's masking) when built with `patch_drop_rate`:
# the layer sits after the position embedding, keeps the class (and register) tokens, draws
# from torch's global RNG and passes everything through in eval mode. It holds no parameters,
# so a tower built with it loads and exports the same weights as one built without.
PATCH_DROPOUT_LAYERS = (PatchDropout, PatchDropoutWithIndices)


def with_patch_dropout(preset: ModelPreset, rate: float) -> ModelPreset:
    """The preset whose image tower drops `rate` of its patch tokens in training (0: unchanged)."""
    if not rate:
        return preset
    return replace(preset, image_kwargs={**preset.image_kwargs, "patch_drop_rate": rate})


def drops_patches(preset: ModelPreset) -> bool:
    """Whether the preset's image tower can drop patch tokens: a timm model that takes
    `patch_drop_rate` and builds a patch dropout layer from it (built on the meta device)."""
    try:
        with torch.device("meta"):
            trunk = timm.create_model(preset.image_tower, pretrained=False, num_classes=0,
                                      **with_patch_dropout(preset, 0.5).image_kwargs)
    except TypeError:  # the constructor has no patch_drop_rate (ResNets, ConvNeXt, Swin, ...)
        return False
    return any(isinstance(m, PATCH_DROPOUT_LAYERS) for m in trunk.modules())


def set_patch_dropout(model: nn.Module, rate: float) -> int:
    """Sets the share of patch tokens every patch dropout layer in `model` drops in training
    (0: none, as FLIP's unmasked tuning); returns the number of layers set."""
    layers = [m for m in model.modules() if isinstance(m, PATCH_DROPOUT_LAYERS)]
    for layer in layers:
        layer.prob = rate
    return len(layers)


def clip_text_config(preset: ModelPreset, eot_id: int, sot_id: int) -> CLIPTextConfig:
    """CLIP's causal text transformer; pooled at the end-of-text token, found by its id."""
    return CLIPTextConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.text_width,
        intermediate_size=4 * preset.text_width, num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads, max_position_embeddings=preset.context_length,
        projection_dim=preset.embed_dim, hidden_act="gelu",
        # transformers pools at the first `eos_token_id` when it is not the legacy value 2.
        eos_token_id=eot_id, bos_token_id=sot_id, pad_token_id=0,
    )


def bert_text_config(preset: ModelPreset) -> BertConfig:
    """BERT's architecture at the preset's size, over CLIP's BPE vocabulary (no download)."""
    return BertConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.text_width,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        intermediate_size=4 * preset.text_width, max_position_embeddings=preset.context_length,
        type_vocab_size=1, pad_token_id=0)


class TextTower(nn.Module):
    """Token ids [B, L] -> TowerOutput. Rows are framed by ClipTokenizer: start token, caption,
    end token, zero padding."""

    def __init__(self, preset: ModelPreset, eot_id: int, sot_id: int):
        super().__init__()
        self.kind = preset.text_tower
        self.eot_id = eot_id
        if self.kind == "clip":
            self.transformer = CLIPTextModelWithProjection(clip_text_config(preset, eot_id, sot_id))
        elif self.kind == "bert":
            self.transformer = BertModel(bert_text_config(preset), add_pooling_layer=True)
            self.proj = CriticProjection(preset.text_width, preset.embed_dim)
        else:
            raise ValueError(f"unknown text tower {self.kind!r}")

    def checkpoint_activations(self, enabled: bool) -> None:
        """Recompute the transformer's layers in the backward instead of keeping their activations."""
        checkpoint_text_transformer(self.transformer, enabled)

    def forward(self, tokens: torch.Tensor) -> TowerOutput:
        if self.kind == "clip":
            # No padding mask: attention is causal and pooling reads the end-of-text position,
            # so the zero padding after it cannot reach the pooled output (as in CLIP).
            out = self.transformer(input_ids=tokens, output_hidden_states=False)
            hidden = out.last_hidden_state
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device),
                            self._eot_position(tokens)]
            return TowerOutput(out.text_embeds, pooled, hidden)
        # Bidirectional: padding must be masked out. Id 0 is a real BPE token ("!"), so the
        # padding is found by position (after the end-of-text token), not by id.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        attention_mask = (positions[None, :] <= self._eot_position(tokens)[:, None]).long()
        out = self.transformer(input_ids=tokens, attention_mask=attention_mask)
        # BERT's pooler reads the first position: the start token plays [CLS].
        return TowerOutput(self.proj(out.pooler_output), out.pooler_output, out.last_hidden_state)

    def _eot_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token of each row (the tokenizer always writes one)."""
        return (tokens == self.eot_id).int().argmax(dim=-1)
