"""Image and text towers, each ending in the shared embedding width. Built from config only."""
import timm
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from engine.models.presets import ModelPreset


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
            # Bias-free, as CLIP's ViT `proj`.
            self.proj = nn.Linear(self.trunk.num_features, preset.embed_dim, bias=False)
        self.feature_dim = self.trunk.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images))


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


class TextTower(nn.Module):
    """Token ids [B, L] -> embeddings [B, embed_dim] (and per-token states for token-level heads)."""

    def __init__(self, preset: ModelPreset, eot_id: int, sot_id: int):
        super().__init__()
        self.transformer = CLIPTextModelWithProjection(clip_text_config(preset, eot_id, sot_id))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # No padding mask: attention is causal and pooling reads the end-of-text position,
        # so the zero padding after it cannot reach the pooled output (as in CLIP).
        return self.transformer(input_ids=tokens).text_embeds
