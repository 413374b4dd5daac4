"""Locking towers (LiT): freeze a tower except its last N blocks, and keep frozen parts in eval mode."""

from __future__ import annotations

from torch import nn

from vgclip.errors import VgclipError

# Where the repeated blocks live: timm EfficientNet/ViT (`blocks`), BERT-likes (`encoder.layer`), others.
BLOCK_PATHS = ("blocks", "encoder.layer", "transformer.layer", "layers", "stages")


def find_blocks(module: nn.Module) -> tuple[str, nn.Module]:
    """The dotted path and container (Sequential/ModuleList) of a tower's blocks."""
    for path in BLOCK_PATHS:
        node: nn.Module | None = module
        for part in path.split("."):
            node = getattr(node, part, None)
            if not isinstance(node, nn.Module):
                break
        if isinstance(node, (nn.Sequential, nn.ModuleList)) and len(node) > 0:
            return path, node
    raise VgclipError(
        f"cannot lock part of {type(module).__name__}: no block list found (looked for {', '.join(BLOCK_PATHS)})"
    )


def lock_tower(module: nn.Module, unlocked_blocks: int = 0) -> None:
    """Freeze every parameter of `module` except its last `unlocked_blocks` blocks.

    With blocks left unlocked, everything after the blocks (e.g. EfficientNet's conv_head/bn2)
    stays trainable too, as in open_clip's `lock(unlocked_groups=N)`.
    """
    for param in module.parameters():
        param.requires_grad_(False)
    if unlocked_blocks <= 0:
        return
    path, blocks = find_blocks(module)
    if unlocked_blocks > len(blocks):
        raise VgclipError(f"unlocked_blocks={unlocked_blocks} but {type(module).__name__} has {len(blocks)} blocks")
    for block in list(blocks)[-unlocked_blocks:]:
        block.requires_grad_(True)
    # Modules registered after the block container, at each level of its path, come after it in
    # the forward pass (heads, final norms), so they are trained with the unlocked blocks.
    parent = module
    for part in path.split("."):
        names = [name for name, _ in parent.named_children()]
        for name in names[names.index(part) + 1 :]:
            getattr(parent, name).requires_grad_(True)
        parent = getattr(parent, part)


def set_frozen_eval(module: nn.Module) -> None:
    """Put every maximal fully-frozen submodule in eval mode (frozen BatchNorm stats, no dropout)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        set_frozen_eval(child)
