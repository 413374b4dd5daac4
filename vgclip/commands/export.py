"""`vgclip export`: write a trained run in another tool's model format (open_clip)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip export`."""
    p = subparsers.add_parser(
        "export",
        help="export a run as an open_clip model folder (open_clip, CLIP_benchmark, the Hugging Face Hub)",
        description="Write open_clip_config.json, open_clip_model.safetensors and the text tower's config and "
        "tokenizer files, so that open_clip.create_model_and_transforms('local-dir:OUT') loads the model. "
        "Before the folder is written in place, open_clip rebuilds the model from it and its embeddings are "
        "compared with vgclip's. The folder gets a model card (README.md), so it can be uploaded to the Hub as "
        "it is.",
    )
    p.add_argument("--checkpoint", required=True, help="run folder (or its model.safetensors), or an open_clip folder")
    p.add_argument("--format", choices=("open_clip",), default="open_clip", help="target format (open_clip)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist, or be empty)")
    p.add_argument("--hub-id", help="Hub repo (ORG/NAME) the folder will be uploaded to: open_clip then reads the "
                   "text tower's config from there (default: this folder's absolute path)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then print where the files went and how closely open_clip reproduces the embeddings."""
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.export.open_clip import export_open_clip

    result = export_open_clip(args.checkpoint, args.out, hub_id=args.hub_id, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {result.out_dir} ({', '.join(result.files)})")
    print(f"open_clip rebuild: largest embedding difference image {result.image_max_diff:.1e}, "
          f"text {result.text_max_diff:.1e}")  # fmt: skip
    print(f"load with: open_clip.create_model_and_transforms('local-dir:{result.out_dir}'), or "
          f"vgclip.load_checkpoint('{result.out_dir}'); model card: {result.out_dir / 'README.md'}")
    return 0
