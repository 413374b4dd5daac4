"""The dual encoder: image tower + text tower, each projected to a shared embedding space."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vgclip.config import Config, ModelConfig
from vgclip.data.transforms import build_image_transform
from vgclip.model.image_tower import ImageTower, build_image_tower, resolved_image_config
from vgclip.model.lock import lock_tower, set_frozen_eval
from vgclip.model.text_tower import TextTower, Tokenizer, build_text_tower, token_inputs

ImageTransform = Callable[[Image.Image], torch.Tensor]


class ClipModel(nn.Module):
    """CLIP-style dual encoder with a learnable temperature."""

    def __init__(self, visual: ImageTower, text: TextTower, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = visual
        self.text = text
        self.image_proj = nn.Linear(visual.output_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.output_dim, config.embed_dim, bias=False)
        # Stored as a log so the optimiser works on an unconstrained value (as in CLIP).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.max_logit_scale = float(config.max_logit_scale)
        # ln(max) as the float32 the parameter can hold: the parameter clamp and forward's cap agree exactly.
        self.max_log_scale = float(torch.tensor(math.log(self.max_logit_scale)))

    @property
    def image_size(self) -> int:
        """Side of the square input images."""
        return self.visual.image_size

    def image_transform(self, train: bool = False) -> ImageTransform:
        """The PIL -> tensor transform this model expects (augmented when `train`)."""
        return build_image_transform(self.visual.image_size, self.visual.mean, self.visual.std, train=train)

    def get_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), with logit_scale clamped at ln(max_logit_scale) (CLIP's 100) to keep training stable."""
        scale = self.logit_scale
        # where(), not clamp(): clamp passes no gradient at the bound itself, where the parameter
        # clamp puts a temperature that wants to come down.
        return torch.where(scale <= self.max_log_scale, scale, scale.new_tensor(self.max_log_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Bring the temperature parameter back within [0, ln(max_logit_scale)], as CLIP and open_clip do
        after every optimizer step: past the cap, forward's clamp would give it no gradient, for good."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B,3,S,S] -> embeddings [B, embed_dim] (unit length when `normalize`)."""
        features = self.image_proj(self.visual(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Tokenizer output -> embeddings [B, embed_dim] (unit length when `normalize`)."""
        input_ids, attention_mask = token_inputs(tokens)
        features = self.text_proj(self.text(input_ids, attention_mask))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both embeddings (normalised) and the temperature, the inputs of ClipLoss."""
        return {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": self.get_logit_scale(),
        }

    def train(self, mode: bool = True) -> ClipModel:
        """Like nn.Module.train, but frozen (locked) parts of the towers stay in eval mode."""
        super().train(mode)
        if mode:
            set_frozen_eval(self.visual)
            set_frozen_eval(self.text)
        return self


def build_model(config: ModelConfig) -> tuple[ClipModel, Tokenizer]:
    """Build the towers (loading their weights), the projections, and apply locking."""
    visual = build_image_tower(config.image)
    text, tokenizer = build_text_tower(config.text)
    # model.config records what timm chose (weights tag, mean/std): a run saves it, so its
    # preprocessing never changes with a timm upgrade.
    config = dataclasses.replace(config, image=resolved_image_config(config.image, visual))
    model = ClipModel(visual, text, config)
    if config.image.lock:
        lock_tower(visual.trunk, config.image.unlocked_blocks)
    if config.text.lock:
        lock_tower(text.transformer, config.text.unlocked_blocks)
    model.train(False)
    return model, tokenizer


def create_model(config: Config | ModelConfig) -> tuple[ClipModel, ImageTransform, Tokenizer]:
    """The model (in eval mode), its eval image transform, and its tokenizer."""
    model_config = config.model if isinstance(config, Config) else config
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"create_model expects a Config or ModelConfig, got {type(config).__name__}")
    model, tokenizer = build_model(model_config)
    return model, model.image_transform(train=False), tokenizer

