"""Optimizer and learning-rate schedule: AdamW with per-tower learning rates, cosine decay after warmup."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vgclip.config import TrainConfig
from vgclip.errors import VgclipError

# Top-level attributes holding the towers (ClipModel's names, which open_clip's CustomTextCLIP shares).
# Projections and the temperature sit outside the towers: they are new, so they train at the base lr
# even when a pretrained tower gets a smaller one.
TOWER_OF_ATTRIBUTE = {"visual": "image", "text": "text"}


def tower_of(param_name: str) -> str:
    """'image', 'text' or 'other' (projections, the logit scale) for a parameter name."""
    return TOWER_OF_ATTRIBUTE.get(param_name.split(".", 1)[0], "other")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay must not touch.

    Decay pulls weights towards zero, which is a sensible prior for matrices but not for biases
    (offsets), normalisation gains (which would shrink activations) or the learned temperature
    (which would be dragged towards 1 and flatten the contrastive logits).
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, norm_types) or param.ndim < 2 or "logit_scale" in full:
                names.add(full)
    return names


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split by tower (own lr) and by decay / no decay.

    Frozen parameters (locked towers) are left out so AdamW keeps no state for them.
    Groups are emitted in a fixed order so an optimizer rebuilt on resume lines up with the saved state.
    """
    lrs = {"image": cfg.image_lr or cfg.lr, "text": cfg.text_lr or cfg.lr, "other": cfg.lr}
    skip_decay = no_decay_names(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (tower_of(name), name not in skip_decay)
        buckets.setdefault(key, []).append(param)
    groups = []
    for tower in ("image", "text", "other"):
        for decay in (True, False):
            params = buckets.get((tower, decay))
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": lrs[tower],
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": f"{tower}/{'decay' if decay else 'no_decay'}",
                    }
                )
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (betas and eps as in CLIP for small batches)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise VgclipError("nothing to train: every parameter is frozen (check model.image.lock / model.text.lock)")
    # The fused kernel updates all parameters in one pass instead of one kernel per tensor: the
    # optimizer step is a large part of a locked-image-tower (LiT) step (README: bench_train).
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at `step`: linear ramp over warmup, then half a cosine down to 0.

    Warmup keeps the first updates small while AdamW's second-moment estimates are still noisy.
    """
    warmup = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR (a plain function, so its state_dict is JSON-friendly)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, cfg.warmup_steps))


@dataclass(frozen=True)
class Optimization:
    """What updates the weights, stepped together and saved together in every checkpoint."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # enabled for fp16 only: loss scaling against gradient underflow
    total_steps: int  # the cosine schedule's length

    @property
    def lr(self) -> float:
        """The rate the next step uses (the scheduler moves on after it)."""
        return self.scheduler.get_last_lr()[0]


def build_optimization(model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device) -> Optimization:
    """AdamW, its warmup-cosine schedule over `total_steps`, and the fp16 grad scaler."""
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return Optimization(optimizer, scheduler, scaler, total_steps)
