"""Settings that depend on the machine a run starts on, resolved once into the saved config.

`train.precision=auto` and `data.num_workers=-1` say "what suits this hardware"; the run folder's
config.yaml records what that meant (bf16 or fp32, how many workers), so a resumed or repeated run
on other hardware can be told apart. TF32 and the memory report are GPU matters too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from vgclip.config import Config
from vgclip.model.loss import ClipLoss
from vgclip.train.distributed import DistInfo

GIB = 2**30


def resolve_for_device(config: Config, info: DistInfo) -> Config:
    """`config` with `auto` precision and `-1` loader workers replaced by this machine's choice."""
    train, data = config.train, config.data
    if train.precision == "auto":
        bf16 = info.device.type == "cuda" and torch.cuda.is_bf16_supported()
        train = dataclasses.replace(train, precision="bf16" if bf16 else "fp32")
    if data.num_workers < 0:
        data = dataclasses.replace(data, num_workers=workers_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return dataclasses.replace(config, train=train, data=data)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for a resolved train.precision; 'fp32' -> no autocast."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def workers_per_process(local_world_size: int) -> int:
    """Loader workers for one of `local_world_size` training processes on this node.

    The CPUs this process may use (its affinity, as under SLURM) are shared by the node's
    processes; each keeps one CPU for itself (the training step, the host side of the GPU).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, local_world_size) - 1)


def configure_device(config: Config, info: DistInfo) -> None:
    """Backend switches for the run: TF32 matmuls and cuDNN convolutions on GPUs (train.tf32)."""
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
        torch.backends.cudnn.allow_tf32 = config.train.tf32
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest convolution once


def static_memory_bytes(model: nn.Module) -> int:
    """Bytes every step holds whatever the batch: weights, plus gradients and AdamW's two moments
    (fp32) for the trainable parameters. Activations come on top and grow with the batch."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        if param.requires_grad:
            total += param.numel() * (param.element_size() + 8)
    return total


def memory_plan(*, static: int, per_sample: float | None, micro_batch: int, accum_steps: int, world_size: int,
                device_bytes: int | None) -> str:
    """One line: the effective global batch and, where known, the expected peak memory per device,
    with the train.accum_steps that would fit when it does not."""
    global_batch = micro_batch * accum_steps * world_size
    line = (f"global batch {global_batch} = {micro_batch} per micro-batch x {accum_steps} accumulation step(s) "
            f"x {world_size} process(es)")
    if per_sample is None:
        return line + f"; weights, gradients and optimizer state: {static / GIB:.2f} GiB per process"
    peak = static + per_sample * micro_batch
    line += f"; expected peak memory {peak / GIB:.1f} GiB per device"
    if device_bytes is not None:
        line += f" of {device_bytes / GIB:.1f} GiB"
        usable = 0.9 * device_bytes - static  # leave room for the allocator's fragmentation
        if peak > 0.9 * device_bytes:
            if usable < per_sample:
                return line + ": the model alone does not fit; lock a tower (model.image.lock=true) or use a smaller one"
            parts = math.ceil(micro_batch / int(usable // per_sample))  # split each micro-batch this many ways
            micro, accum = math.ceil(micro_batch / parts), parts * accum_steps
            return line + (f": will not fit; try data.batch_size={micro} train.accum_steps={accum} (global batch "
                           f"{micro * accum * world_size}; accumulation keeps the whole batch in one contrast)")
    return line


def activation_bytes_per_sample(model: nn.Module, tokenizer, *, image_size: int, autocast,
                                device: torch.device) -> float | None:
    """Peak activation memory per sample of one forward + backward, measured on the GPU with two
    small random batches (None on other devices, or when even those do not fit). Gradients are
    cleared and the random streams restored afterwards: training starts as if this never ran."""
    if device.type != "cuda":
        return None
    peaks = []
    with torch.random.fork_rng(devices=[device]):
        for n in (2, 4):
            images = torch.randn(n, 3, image_size, image_size, device=device)
            tokens = {k: v.to(device) for k, v in tokenizer(["a photo of " + "word " * 200] * n).items()}
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            try:
                with autocast():
                    out = model(images, tokens)
                    loss = ClipLoss()(out["image_embeds"], out["text_embeds"], out["logit_scale"])
                loss.backward()
            except torch.cuda.OutOfMemoryError:
                return None
            finally:
                model.zero_grad(set_to_none=True)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return max(0.0, (peaks[1] - peaks[0]) / 2)


def report_memory(config: Config, info: DistInfo, model: nn.Module, tokenizer) -> None:
    """Print (rank 0) the effective global batch and the expected peak memory per device."""
    per_sample = activation_bytes_per_sample(model, tokenizer, image_size=config.model.image.image_size,
                                             autocast=autocast_for(config.train.precision, info.device),
                                             device=info.device)
    device_bytes = torch.cuda.get_device_properties(info.device).total_memory if info.device.type == "cuda" else None
    if info.is_main:
        print("vgclip train: " + memory_plan(static=static_memory_bytes(model), per_sample=per_sample,
                                             micro_batch=config.data.batch_size, accum_steps=config.train.accum_steps,
                                             world_size=info.world_size, device_bytes=device_bytes),
              file=sys.stderr, flush=True)  # with the other progress lines: stdout stays the caller's
