"""The training loop: read it top to bottom.

    train()            check the data, set up the process group, run, clean up
    _setup()           seed -> model -> (DDP) -> optimizer, schedule, scaler -> resume
    _run_epoch()       micro-batches -> forward_backward (step.py) -> clip -> update -> log -> checkpoint
    _end_of_epoch()    validate, checkpoint, prune
Everything a step needs lives in one `_Run` record, so the helpers stay small and their
arguments stay honest. Each config section goes where it belongs: the model gets ModelConfig,
the loader DataConfig, the optimizer TrainConfig.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgclip.config import Config, config_to_dict, save_config
from vgclip.errors import VgclipError
from vgclip.train import distributed as D
from vgclip.train import state as S
from vgclip.train.evaluate import validate
from vgclip.train.logging import MetricsLogger
from vgclip.train.grads import clip_gradients, keep_embedding_grads, zero_grads
from vgclip.train.optim import build_optimizer, build_scheduler
from vgclip.train.step import forward_backward


@dataclass
class _Run:
    """The state of one training run (one process)."""

    config: Config
    info: D.DistInfo
    run_dir: Path
    data_dir: Path
    model: torch.nn.Module  # what the step calls: DDP- and/or compile-wrapped
    raw: torch.nn.Module  # the bare ClipModel: saved, validated
    tokenizer: Any
    train_tf: Any
    eval_tf: Any
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    pos: S.Position
    total_steps: int
    has_val: bool
    logger: MetricsLogger | None = None
    feature_cache: Any = None  # LiT: cached image features (cache.py), or None


def train(config: Config, data_dir: str | Path, out_dir: str | Path, *, resume: str | Path | None = None,
          voc_root: str | Path | None = None) -> dict[str, Any]:
    """Train CLIP on the shards in `data_dir`; write the run folder `out_dir`; return a summary.

    `resume`: "latest" (newest checkpoint of `out_dir`) or a checkpoint folder.
    `voc_root`: if given, the final model is evaluated zero-shot on Pascal VOC (summary["zeroshot"]).
    """
    data_dir, run_dir = Path(data_dir), Path(out_dir)
    n_train, has_val = check_shards(data_dir)
    info = D.init_distributed()
    try:
        run = _setup(config, info, data_dir, run_dir, resume, n_train, has_val)
        started, start_step = time.perf_counter(), run.pos.step
        last_loss, val = math.nan, {}
        try:
            for epoch in range(run.pos.epoch, config.train.epochs):
                last_loss, finished_epoch = _run_epoch(run, epoch)
                val = _end_of_epoch(run, epoch, finished_epoch)
                if not finished_epoch:  # stopped by train.max_steps
                    break
        finally:
            if run.logger is not None:
                run.logger.close()
        return _finish(run, n_train, last_loss, val, time.perf_counter() - started, start_step, voc_root)
    finally:
        D.cleanup(info)


def check_shards(data_dir: Path) -> tuple[int, bool]:
    """(number of training samples, whether a val split exists); one-line errors for bad folders."""
    from vgclip.data.loader import count_samples, list_shards

    if not data_dir.is_dir():
        raise VgclipError(f"--data {data_dir}: no such folder (create shards with `vgclip prepare`)")
    list_shards(data_dir, "train")  # one-line VgclipError when there are none
    n_train = count_samples(data_dir, "train")
    if n_train <= 0:
        raise VgclipError(f"--data {data_dir}: the train shards hold no usable samples")
    try:
        has_val = count_samples(data_dir, "val") > 0
    except VgclipError:  # no val split: train without validation
        has_val = False
    return n_train, has_val


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for the precision ('fp32' -> no autocast)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise VgclipError(f"train.precision={precision!r}: expected fp32, bf16 or fp16")
    dtype = dtypes[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _setup(config: Config, info: D.DistInfo, data_dir: Path, run_dir: Path, resume, n_train: int,
           has_val: bool) -> _Run:
    from vgclip.model.clip import create_model
    from vgclip.model.loss import ClipLoss

    cfg = config.train
    autocast_for(cfg.precision, info.device)  # fail on a bad setting before any work
    if cfg.accum_steps < 1 or cfg.epochs < 0 or cfg.max_steps < 0:
        raise VgclipError("train.accum_steps must be >= 1, train.epochs and train.max_steps >= 0")
    if config.data.batch_size < 1:
        raise VgclipError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    raw, eval_tf, tokenizer = create_model(config.model)
    raw.to(info.device)
    if cfg.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor cores
        raw.to(memory_format=torch.channels_last)
    raw.train()
    optimizer = build_optimizer(raw, cfg)
    total = total_steps(config, n_train, info.world_size)
    scheduler = build_scheduler(optimizer, cfg, total)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    loss_fn = ClipLoss(local_loss=cfg.local_loss)  # gathers features across ranks itself
    run = _Run(config, info, run_dir, data_dir, raw, raw, tokenizer, raw.image_transform(train=config.data.augment),
               eval_tf, loss_fn, optimizer, scheduler, scaler, S.Position(), total, has_val)
    if resume is not None:
        ckpt = S.resolve_resume(run_dir, resume)
        run.pos = S.load_train_state(ckpt, model=raw, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    else:
        seed_everything(cfg.seed + info.rank)  # different dropout masks per rank
    if info.is_main:
        from vgclip.model.checkpoint import save_text_tower_files

        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        # With these beside them, step checkpoints load with vgclip.load_checkpoint(RUN/checkpoints/step-N).
        save_text_tower_files(run_dir / "text_tower", raw, tokenizer)
        run.logger = MetricsLogger(run_dir, resume_step=run.pos.step if resume is not None else None)
    D.barrier(info)
    run.feature_cache = _maybe_feature_cache(run)
    module = raw
    if run.feature_cache is not None:
        from vgclip.train.cache import CachedImageClip

        module = CachedImageClip(raw)  # same parameters, image tower replaced by the cache
    if not info.distributed and not cfg.compile:
        keep_embedding_grads(raw)  # sparse vocabulary gradients (see vgclip/train/grads.py)
    run.model = D.wrap_model(module, info)
    if cfg.compile:
        run.model = torch.compile(run.model)
    return run


def total_steps(config: Config, n_train: int, world_size: int) -> int:
    """Optimizer steps in the whole run (the cosine schedule's length)."""
    # The loader drops each epoch's last partial batch; a last partial accumulation group still steps.
    batches = max(1, n_train // (config.data.batch_size * world_size))
    steps = config.train.epochs * math.ceil(batches / max(1, config.train.accum_steps))
    return min(steps, config.train.max_steps) if config.train.max_steps > 0 else steps


def _batches(run: _Run, epoch: int) -> Iterator:
    """This rank's training micro-batches for `epoch`, starting where a resumed run left off."""
    start = run.pos.batch_in_epoch if epoch == run.pos.epoch else 0
    if run.feature_cache is not None:
        return run.feature_cache.batches(epoch=epoch, start_batch=start)
    from vgclip.data.loader import make_loader

    # uint8 pixels travel to the device (a quarter of the bytes) and are normalised there (_to_device).
    loader = make_loader(run.data_dir, "train", run.config.data, run.train_tf, run.tokenizer, train=True,
                         seed=run.config.train.seed, epoch=epoch, rank=run.info.rank,
                         world_size=run.info.world_size, start_batch=start, normalize=False)
    # torch's DataLoader draws a base seed from the global RNG when an iterator starts. A resumed run
    # starts its iterator after restoring the RNG, a straight run before: keep the draw out of the
    # global stream so both continue identically (the loader seeds its own augmentation).
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _to_device(run: _Run, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, tokens = batch
    fmt = torch.channels_last if run.config.train.channels_last and images.ndim == 4 else torch.contiguous_format
    # Move first, then change layout (a no-op for the loader's channels-last pixels when fmt is
    # channels-last): the copy then runs on the device, and a pinned batch keeps its async transfer.
    images = images.to(run.info.device, non_blocking=True).contiguous(memory_format=fmt)
    if images.dtype == torch.uint8:  # loader pixels, not cached features: normalise on the device
        images = run.train_tf.normalize(images)
    return images, {k: v.to(run.info.device, non_blocking=True) for k, v in tokens.items()}


def _run_epoch(run: _Run, epoch: int) -> tuple[float, bool]:
    """Train one epoch (or its remainder). Returns (last loss, whether the epoch's data ran out)."""
    cfg = run.config.train
    from tqdm.auto import tqdm

    batches = _batches(run, epoch)
    bar = tqdm(total=run.total_steps, initial=run.pos.step, desc=f"epoch {epoch}", disable=not run.info.is_main,
               dynamic_ncols=True, leave=False)
    loss, tick, exhausted = math.nan, time.perf_counter(), False
    try:
        while not (cfg.max_steps and run.pos.step >= cfg.max_steps):
            group = [_to_device(run, b) for b in itertools.islice(batches, cfg.accum_steps)]
            # One process: a short last group still makes a step. Several: all ranks must take the same
            # steps with the same shapes (the loss all-gathers), so the epoch ends when any runs short.
            full = len(group) == cfg.accum_steps
            if not (D.all_ranks(full, run.info) if run.info.distributed else group):
                exhausted = True
                break
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on after it)
            loss, grad_norm = _optimizer_step(run, group)
            n = sum(len(images) for images, _ in group) * run.info.world_size
            run.pos.batch_in_epoch += len(group)
            run.pos.samples_seen += n
            rate = n / max(time.perf_counter() - tick, 1e-9)
            tick = time.perf_counter()
            if math.isfinite(loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                if run.logger and run.pos.step % max(1, cfg.log_every) == 0:
                    run.logger.log(run.pos.step, "train", epoch=epoch, loss=loss, lr=lr, samples_per_s=rate,
                                   grad_norm=grad_norm)
                if cfg.checkpoint_every and run.pos.step % cfg.checkpoint_every == 0:
                    _checkpoint(run)
    finally:
        bar.close()
    return loss, exhausted


def _optimizer_step(run: _Run, group) -> tuple[float, float]:
    """Forward/backward over the micro-batches, then clip and update; skip non-finite steps."""
    cfg = run.config.train
    loss = forward_backward(run.model, run.loss_fn, group, autocast=autocast_for(cfg.precision, run.info.device),
                            scaler=run.scaler, all_finite=lambda t: D.all_finite(t, run.info))
    grad_norm = math.nan
    if math.isfinite(loss):
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = clip_gradients(run.optimizer, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        # fp16: GradScaler skips steps with inf gradients itself (and lowers its scale): not a bad step.
        if math.isfinite(grad_norm) or run.scaler.is_enabled():
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            zero_grads(run.optimizer)
            run.pos.step += 1
            return loss, grad_norm
    zero_grads(run.optimizer)
    _bad_step(run, loss, grad_norm)
    return math.nan, grad_norm


def _bad_step(run: _Run, loss: float, grad_norm: float) -> None:
    """Count a skipped update; give up once there were too many (the run has diverged)."""
    run.pos.bad_steps += 1
    what = f"loss={loss}" if not math.isfinite(loss) else f"grad_norm={grad_norm}"
    if run.logger:
        run.logger.log(run.pos.step, "train", loss=loss, note=f"skipped non-finite step ({what})")
    limit = run.config.train.max_bad_steps
    if run.pos.bad_steps >= limit:
        raise VgclipError(
            f"training stopped: {run.pos.bad_steps} steps had a non-finite {what.split('=')[0]} "
            f"(train.max_bad_steps={limit}); lower train.lr or use train.precision=fp32/bf16, then resume "
            f"from the last good checkpoint in {run.run_dir / 'checkpoints'}"
        )


def _end_of_epoch(run: _Run, epoch: int, finished: bool) -> dict[str, float]:
    """Validate (rank 0), then checkpoint (at the start of the next epoch if this one is finished)."""
    val: dict[str, float] = {}
    if run.has_val and run.info.is_main:
        val = _validate(run)
        run.logger.log(run.pos.step, "val", epoch=epoch, **{k: v for k, v in val.items() if k != "samples"})
    D.barrier(run.info)
    if finished:
        run.pos.epoch, run.pos.batch_in_epoch = epoch + 1, 0
    run.pos.val_loss = val.get("loss")
    if run.pos.val_loss is not None and (run.pos.best_val_loss is None or run.pos.val_loss < run.pos.best_val_loss):
        run.pos.best_val_loss = run.pos.val_loss
    _checkpoint(run)
    run.pos.val_loss = None
    return val


def _validate(run: _Run) -> dict[str, float]:
    from vgclip.data.loader import make_loader

    data_cfg = replace(run.config.data, augment=False)
    batches = make_loader(run.data_dir, "val", data_cfg, run.eval_tf, run.tokenizer, train=False,
                          seed=run.config.train.seed, epoch=0, rank=0, world_size=1, start_batch=0)
    rng = S.rng_state()  # validation must not shift the training random stream
    try:
        return validate(run.raw, batches, device=run.info.device,
                        autocast=autocast_for(run.config.train.precision, run.info.device),
                        max_samples=run.config.train.val_max_samples)
    finally:
        S.set_rng_state(*rng)


def _checkpoint(run: _Run) -> None:
    """Rank 0 writes RUN/checkpoints/step-N/ and prunes old ones; the others wait."""
    if run.info.is_main:
        root = run.run_dir / "checkpoints"
        S.save_train_state(root, model=run.raw, optimizer=run.optimizer, scheduler=run.scheduler,
                           scaler=run.scaler, position=run.pos, config=config_to_dict(run.config))
        S.prune_checkpoints(root, max(1, run.config.train.keep_checkpoints))
    D.barrier(run.info)


def _finish(run: _Run, n_train: int, loss: float, val: dict, seconds: float, start_step: int, voc_root) -> dict:
    """Save the final weights (rank 0) and summarise the run."""
    from vgclip.model.checkpoint import save_model

    if run.info.is_main:
        save_model(run.run_dir, run.raw, run.tokenizer, run.config)
    D.barrier(run.info)
    summary = {
        "run_dir": str(run.run_dir), "steps": run.pos.step, "epochs": run.pos.epoch, "train_samples": n_train,
        "samples_seen": run.pos.samples_seen, "final_train_loss": loss, "val": val,
        "best_val_loss": run.pos.best_val_loss, "bad_steps": run.pos.bad_steps, "seconds": seconds,
        "steps_this_session": run.pos.step - start_step,
    }
    if voc_root is not None and run.info.is_main:
        try:
            summary["zeroshot"] = _zeroshot(run, Path(voc_root))
        except VgclipError as exc:  # the trained model is saved: report the evaluation problem, don't fail
            summary["zeroshot"] = {"error": str(exc)}
    return summary


def _zeroshot(run: _Run, voc_root: Path) -> dict:
    """Zero-shot VOC test report of the final model into RUN/zeroshot/; returns its headline numbers."""
    from vgclip.eval.zeroshot import ZeroshotOptions, run_zeroshot

    options = ZeroshotOptions(num_workers=run.config.data.num_workers, checkpoint=str(run.run_dir))
    report = run_zeroshot(run.raw, run.eval_tf, run.tokenizer, voc_root, "test", run.config.eval,
                          run.run_dir / "zeroshot", options, device=run.info.device)
    run.raw.train()
    return {k: report[k] for k in ("mAP", "chance_mean") if k in report} | {"report": str(run.run_dir / "zeroshot")}


def _maybe_feature_cache(run: _Run):
    """LiT shortcut: the cached image-feature path when the image tower can never change."""
    from vgclip.train.cache import cache_applies, build_feature_cache

    if not cache_applies(run.config):
        return None
    return build_feature_cache(run)
