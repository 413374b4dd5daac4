"""`vgclip train`: train the dual encoder on prepared shards; resumable; multi-GPU under torchrun."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from vgclip.config import DEFAULT_PRESET, config_to_dict, load_config
from vgclip.errors import VgclipError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `vgclip train`."""
    p = subparsers.add_parser(
        "train",
        help="train CLIP on prepared shards (checkpoints, exact resume, accumulation, DDP)",
        description="Train on SHARDS/train (validating on SHARDS/val each epoch when present, or on --val-data) "
        "and write the run folder: config.yaml, model.safetensors, text_tower/, metrics.csv, checkpoints/step-N/. "
        "--data and --val-data take a folder written by `vgclip prepare`, the same behind https:// s3:// gs://, "
        "a brace pattern of tar files ('cc3m/{00000..00331}.tar', img2dataset / open_clip layout) or pipe:COMMAND. "
        "Several GPUs: torchrun --nproc_per_node N -m vgclip.cli train ...",
    )
    p.add_argument("--data", required=True, help="shards: a folder written by `vgclip prepare` (or its URL), "
                   "a brace pattern of tar files, or pipe:COMMAND")
    p.add_argument("--val-data", help="validation shards, same forms as --data (a folder: its val split; a pattern: "
                   "all of it); default: the val split of the --data folder, none for a pattern")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--config", help="preset name (tiny, offline-small, offline-base, seed) or a YAML file; default: "
                   f"the run's config.yaml when resuming, else {DEFAULT_PRESET} (works with no network)")
    p.add_argument("--resume", help="'latest' (newest checkpoint in --out) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that already holds checkpoints (they are deleted)")
    p.add_argument("--voc-root", type=Path, help="evaluate the final model zero-shot on this Pascal VOC folder")
    p.add_argument("--val-voc-root", type=Path, help="a held-out VOC-layout folder scored zero-shot after every "
                   "epoch (its val split, else test): mAP in metrics.csv; train.select_by=zeroshot_map keeps the "
                   "best checkpoint by it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, check the run folder, train, print the summary as JSON."""
    # the command's library, imported when it runs (the CLI and `vgclip --help` stay light)
    from vgclip.train.loop import train

    config_source = args.config
    saved = args.out / "config.yaml"
    if config_source is None and args.resume and saved.is_file():
        config_source = str(saved)  # a resumed run keeps its settings unless told otherwise
    elif config_source is None:
        config_source = DEFAULT_PRESET
    config = load_config(config_source, args.overrides)
    if args.resume and saved.is_file() and config_source != str(saved):
        _warn_if_config_changed(load_config(str(saved)), config)
    checkpoints = args.out / "checkpoints"
    if args.resume is None and checkpoints.is_dir() and any(checkpoints.iterdir()):
        if not args.overwrite:
            raise VgclipError(f"{args.out} already holds a run's checkpoints: pass --resume latest to continue it "
                              "or --overwrite to start again")
        shutil.rmtree(checkpoints)
    summary = train(config, args.data, args.out, resume=args.resume, voc_root=args.voc_root,
                    val_data=args.val_data, val_voc_root=args.val_voc_root)
    if summary["failed_shards"]:
        print(f"vgclip train: warning: {len(summary['failed_shards'])} shard(s) could not be read to the end and "
              f"were skipped: {' '.join(summary['failed_shards'])}", file=sys.stderr)
    print(json.dumps(summary, default=str))
    return 0


def _warn_if_config_changed(saved, config) -> None:
    """A resumed run continues exactly only with the settings it started with: name what differs."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    before, after = flat(config_to_dict(saved)), flat(config_to_dict(config))
    changed = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after.get(k)]
    if changed:
        print("vgclip train: warning: resuming with settings that differ from the run's config.yaml "
              f"(the run will not match an uninterrupted one): {'; '.join(changed)}", file=sys.stderr)
