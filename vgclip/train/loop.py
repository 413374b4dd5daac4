"""The training loop: read it top to bottom.

    train()          check the data, join the process group, set up, run the epochs, finish
    _train_epoch()   the hot path: micro-batches -> forward_backward -> clip -> step -> log -> checkpoint
    _end_of_epoch()  validate, checkpoint, prune
Setup builds three records, each with one owner: `RunContext` (where and with what this process
trains; fixed), `Parts` (the model as the step calls it, the bare model, tokenizer and transforms;
fixed) and `Optimization` (optimizer, schedule, grad scaler; optim.py). The only state that moves
is the `Position` (state.py): completed steps and the data position, which checkpoints save.
Each config section goes where it belongs: the model gets ModelConfig, the loader DataConfig,
the optimizer TrainConfig.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vgclip.config import Config, config_to_dict, save_config
from vgclip.data.epoch_plan import batches_per_rank
from vgclip.data import loader as data_loader  # called as data_loader.make_loader: tests replace it there
from vgclip.data.shard_locations import as_location
from vgclip.errors import VgclipError
from vgclip.export.model_card import finish_run_card
from vgclip.model.checkpoint import save_model, save_text_tower_files
from vgclip.model.clip import create_model
from vgclip.model.loss import ClipLoss
from vgclip.summary import TrainSummary
from vgclip.train import distributed as D
from vgclip.train import state as S
from vgclip.train import best_weights, final_report, zeroshot_tracking
from vgclip.train.advice import warn_small_data
from vgclip.train.cache import CachedImageClip, build_feature_cache, cache_applies
from vgclip.train.evaluate import validate
from vgclip.train.grads import clip_gradients, keep_embedding_grads, zero_grads
from vgclip.train.inputs import DataReport, ValSource, check_shards
from vgclip.train.logging import MetricsLogger
from vgclip.train.optim import Optimization, build_optimization
from vgclip.train.runtime import autocast_for, configure_device, report_memory, resolve_for_device
from vgclip.train.step import forward_backward


@dataclass(frozen=True)
class RunContext:
    """Where this process trains and on what: set once by `train`, read by everything."""

    config: Config
    info: D.DistInfo
    data_dir: Path | str  # a local folder, or a URL / shard pattern (vgclip.data.shard_locations)
    run_dir: Path
    val: ValSource | None  # where validation reads (inputs.py), None: no validation
    batches_per_epoch: int  # micro-batches every rank takes per epoch (data/epoch_plan.py)
    data_report: DataReport = field(default_factory=DataReport)  # skips of this session's loaders
    val_voc: zeroshot_tracking.ValVoc | None = None  # --val-voc-root: scored zero-shot each epoch (zeroshot_tracking)


@dataclass(frozen=True)
class Parts:
    """What setup builds once and the loop only calls."""

    model: nn.Module  # what the step calls: DDP- and/or compile-wrapped, or the LiT cache wrapper
    raw: nn.Module  # the bare ClipModel: saved, validated
    tokenizer: Any
    train_tf: Any
    eval_tf: Any
    loss_fn: nn.Module
    feature_cache: Any = None  # LiT: cached image features (cache.py), or None


def train(config: Config, data_dir: str | Path, out_dir: str | Path, *, resume: str | Path | None = None,
          voc_root: str | Path | None = None, val_data: str | Path | None = None,
          val_voc_root: str | Path | None = None) -> dict[str, Any]:
    """Train CLIP on the shards at `data_dir`; write the run folder `out_dir`; return a summary.

    `data_dir` / `val_data`: any location vgclip.data.shard_locations reads (folder, URL, brace pattern, pipe:);
    validation reads `val_data` if given, else the val split of a `data_dir` folder (inputs.py).

    `resume`: "latest" (newest checkpoint of `out_dir`) or a checkpoint folder.
    `voc_root`: if given, the final model is evaluated zero-shot on Pascal VOC (summary["zeroshot"]).
    `val_voc_root`: a held-out VOC-layout folder scored zero-shot after every epoch (metrics.csv
    `zeroshot_map`); needed by train.select_by=zeroshot_map (the best checkpoint -> RUN/best.safetensors).
    """
    run_dir = Path(out_dir)
    n_train, val_source = check_shards(data_dir, config.data, val_data)
    val_voc = zeroshot_tracking.check_val_voc(val_voc_root, config)  # before any work, on every rank
    info = D.init_distributed()
    try:
        D.check_shared_folder(run_dir, info)  # before any rank reads (resume) or rank 0 writes the run folder
        config = resolve_for_device(config, info)  # "auto" settings -> this hardware's; saved as resolved
        configure_device(config, info)
        if info.is_main:
            warn_small_data(config, n_train)
        ctx = RunContext(config, info, as_location(data_dir), run_dir, val_source,
                         batches_per_rank(n_train, info.world_size, config.data.batch_size), val_voc=val_voc)
        seed_everything(config.train.seed)  # same seed on every rank: identical initial weights
        raw, eval_tf, tokenizer = _build_model(ctx)
        ctx = replace(ctx, config=replace(config, model=raw.config))  # timm's weight tag and mean/std resolved
        opt = build_optimization(raw, config.train, total_steps(config, ctx.batches_per_epoch), info.device)
        pos = _start_position(ctx, raw, opt, resume)
        logger = _prepare_run_folder(ctx, raw, tokenizer, resume_step=None if resume is None else pos.step)
        report_memory(config, info, raw, tokenizer)  # before the first step: will the batch fit?
        started, start_step = time.perf_counter(), pos.step
        last_loss, val = math.nan, {}
        try:
            parts = _training_parts(ctx, raw, eval_tf, tokenizer)
            for epoch in range(pos.epoch, config.train.epochs):
                last_loss, finished_epoch = _train_epoch(ctx, parts, opt, pos, logger, epoch)
                val = _end_of_epoch(ctx, parts, opt, pos, logger, epoch, finished_epoch)
                if not finished_epoch:  # stopped by train.max_steps
                    break
        finally:
            if logger is not None:
                logger.close()
        summary = _finish(ctx, parts, pos, n_train, last_loss, val, time.perf_counter() - started, start_step)
        if voc_root is not None and info.is_main:
            summary = replace(summary, zeroshot=final_report.final_zeroshot(
                parts.raw, parts.eval_tf, parts.tokenizer, ctx.config, ctx.run_dir, Path(voc_root), info.device))
        if info.is_main:  # after the zero-shot report, so the model card (RUN/README.md) can quote it
            finish_run_card(ctx.run_dir, summary, world_size=info.world_size, device=str(info.device))
        return summary.to_dict()  # the JSON form: `vgclip train` prints it, callers read it by key
    finally:
        D.cleanup(info)


def _train_epoch(ctx: RunContext, parts: Parts, opt: Optimization, pos: S.Position, logger: MetricsLogger | None,
                 epoch: int) -> tuple[float, bool]:
    """Train one epoch (or its remainder). Returns (last loss, whether the epoch's data ran out)."""
    from tqdm.auto import tqdm

    cfg, info = ctx.config.train, ctx.info
    batches = _batches(ctx, parts, epoch, start=pos.batch_in_epoch if epoch == pos.epoch else 0)
    autocast = autocast_for(cfg.precision, info.device)
    bar = tqdm(total=opt.total_steps, initial=pos.step, desc=f"epoch {epoch}", disable=not info.is_main,
               dynamic_ncols=True, leave=False)
    loss, tick = math.nan, time.perf_counter()
    try:
        while not (cfg.max_steps and pos.step >= cfg.max_steps):
            want = min(cfg.accum_steps, ctx.batches_per_epoch - pos.batch_in_epoch)  # the last group may be short
            group = [_to_device(ctx, parts, b) for b in itertools.islice(batches, max(0, want))]
            if not _group_ready(group, want, info):
                return loss, True
            lr = opt.lr
            loss = forward_backward(parts.model, parts.loss_fn, group, autocast=autocast, scaler=opt.scaler,
                                    all_finite=lambda t: D.all_finite(t, info))
            stepped, grad_norm = _update(opt, cfg.grad_clip) if math.isfinite(loss) else (False, math.nan)
            if stepped:
                parts.raw.clamp_logit_scale()  # as CLIP: the temperature parameter stays within [0, ln max]
                pos.step += 1
            else:  # nothing was applied: count it, give up after too many
                zero_grads(opt.optimizer)
                _bad_step(ctx, pos, logger, loss, grad_norm)
                loss = math.nan
            n = sum(len(images) for images, _ in group) * info.world_size
            pos.batch_in_epoch += len(group)
            pos.samples_seen += n
            rate, tick = n / max(time.perf_counter() - tick, 1e-9), time.perf_counter()
            if math.isfinite(loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                if logger and pos.step % cfg.log_every == 0:
                    logger.log(pos.step, "train", epoch=epoch, loss=loss, lr=lr, samples_per_s=rate,
                               grad_norm=grad_norm)
                if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                    _checkpoint(ctx, parts, opt, pos)
    finally:
        bar.close()
    return loss, False


def _group_ready(group: list, want: int, info: D.DistInfo) -> bool:
    """Whether this group of micro-batches makes a step: it holds the `want` the plan expects, on every rank.

    All ranks must take the same steps with the same shapes (the loss all-gathers), so should a
    rank's loader run short of the plan (unreadable images), the epoch ends for all of them.
    """
    ready = want > 0 and len(group) == want
    return D.all_ranks(ready, info) if info.distributed else ready


def _update(opt: Optimization, grad_clip: float) -> tuple[bool, float]:
    """Clip and apply the accumulated gradients: (whether a step was taken, the gradient norm)."""
    opt.scaler.unscale_(opt.optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = clip_gradients(opt.optimizer, grad_clip if grad_clip > 0 else math.inf)
    # fp16: GradScaler skips steps with inf gradients itself (and lowers its scale): not a bad step.
    if not (math.isfinite(grad_norm) or opt.scaler.is_enabled()):
        return False, grad_norm
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    zero_grads(opt.optimizer)
    return True, grad_norm


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(config: Config, batches_per_epoch: int) -> int:
    """Optimizer steps in the whole run (the cosine schedule's length): the steps the loop takes."""
    # A last partial accumulation group still steps.
    steps = config.train.epochs * math.ceil(batches_per_epoch / config.train.accum_steps)
    return min(steps, config.train.max_steps) if config.train.max_steps > 0 else steps


def _build_model(ctx: RunContext) -> tuple[nn.Module, Any, Any]:
    """(bare ClipModel on the device in train mode, eval transform, tokenizer)."""
    raw, eval_tf, tokenizer = create_model(ctx.config.model)
    raw.to(ctx.info.device)
    if ctx.config.train.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor cores
        raw.to(memory_format=torch.channels_last)
    raw.train()
    return raw, eval_tf, tokenizer


def _start_position(ctx: RunContext, raw: nn.Module, opt: Optimization, resume) -> S.Position:
    """A fresh Position, or the checkpoint's (weights, optimizer and random streams restored)."""
    if resume is None:
        seed_everything(ctx.config.train.seed + ctx.info.rank)  # different dropout masks per rank
        return S.Position()
    ckpt = S.resolve_resume(ctx.run_dir, resume)
    return S.load_train_state(ckpt, model=raw, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
                              rank=ctx.info.rank)


def _prepare_run_folder(ctx: RunContext, raw: nn.Module, tokenizer, *, resume_step: int | None) -> MetricsLogger | None:
    """Rank 0 writes config.yaml and text_tower/ and opens metrics.csv; the others wait."""
    logger = None
    if ctx.info.is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(ctx.config, ctx.run_dir / "config.yaml")
        # With these beside them, step checkpoints load with vgclip.load_checkpoint(RUN/checkpoints/step-N).
        save_text_tower_files(ctx.run_dir / "text_tower", raw, tokenizer)
        logger = MetricsLogger(ctx.run_dir, resume_step=resume_step)
    D.barrier(ctx.info)
    return logger


def _training_parts(ctx: RunContext, raw: nn.Module, eval_tf, tokenizer) -> Parts:
    """The model as the step calls it (LiT cache, sparse vocabulary gradients, DDP, compile) and the loss."""
    cfg, info = ctx.config.train, ctx.info
    if cfg.compile:  # one compiled graph: text batches padded to max_length never change shape
        tokenizer = tokenizer.with_fixed_length()
    cache, module = None, raw
    if cache_applies(ctx.config):  # the image tower can never change: embed each image once
        cache = build_feature_cache(ctx.config, data_dir=ctx.data_dir, run_dir=ctx.run_dir, visual=raw.visual,
                                    eval_tf=eval_tf, tokenizer=tokenizer, info=info)
        module = CachedImageClip(raw)  # same parameters, image tower replaced by the cache
    if cfg.sparse_embedding_grads and not info.distributed and not cfg.compile:
        keep_embedding_grads(raw)  # the speed path of vgclip/train/grads.py
    model = D.wrap_model(module, info)
    if cfg.compile:
        model = torch.compile(model)
    return Parts(model, raw, tokenizer, raw.image_transform(train=ctx.config.data.augment), eval_tf,
                 ClipLoss(rank=info.rank, world_size=info.world_size, local_loss=cfg.local_loss,
                          multi_positive=cfg.loss == "multipositive"), cache)


def _batches(ctx: RunContext, parts: Parts, epoch: int, *, start: int) -> Iterator:
    """This rank's training micro-batches for `epoch`, from micro-batch `start` on (a resumed run)."""
    if parts.feature_cache is not None:
        return parts.feature_cache.batches(epoch=epoch, start_batch=start)
    # uint8 pixels travel to the device (a quarter of the bytes) and are normalised there (_to_device).
    loader = data_loader.make_loader(ctx.data_dir, "train", ctx.config.data, parts.train_tf, parts.tokenizer,
                                     train=True, seed=ctx.config.train.seed, epoch=epoch, rank=ctx.info.rank,
                                     world_size=ctx.info.world_size, start_batch=start, normalize=False)
    ctx.data_report.track(loader)  # its skips and unreadable shards go to the run summary
    return iter(loader)  # the loader keeps its iterator's seed draw out of the global random stream


def _to_device(ctx: RunContext, parts: Parts, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, tokens = batch
    device = ctx.info.device
    fmt = torch.channels_last if ctx.config.train.channels_last and images.ndim == 4 else torch.contiguous_format
    # Move first, then change layout (a no-op for the loader's channels-last pixels when fmt is
    # channels-last): the copy then runs on the device, and a pinned batch keeps its async transfer.
    images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    if images.dtype == torch.uint8:  # loader pixels, not cached features: normalise on the device
        images = parts.train_tf.normalize(images)
    return images, {k: v.to(device, non_blocking=True) for k, v in tokens.items()}


def _bad_step(ctx: RunContext, pos: S.Position, logger: MetricsLogger | None, loss: float, grad_norm: float) -> None:
    """Count a skipped update; give up once there were too many (the run has diverged)."""
    pos.bad_steps += 1
    what = f"loss={loss}" if not math.isfinite(loss) else f"grad_norm={grad_norm}"
    if logger:
        logger.log(pos.step, "train", loss=loss, note=f"skipped non-finite step ({what})")
    limit = ctx.config.train.max_bad_steps
    if pos.bad_steps >= limit:
        raise VgclipError(
            f"training stopped: {pos.bad_steps} steps had a non-finite {what.split('=')[0]} "
            f"(train.max_bad_steps={limit}); lower train.lr or use train.precision=fp32/bf16, then resume "
            f"from the last good checkpoint in {ctx.run_dir / 'checkpoints'}"
        )


def _end_of_epoch(ctx: RunContext, parts: Parts, opt: Optimization, pos: S.Position, logger: MetricsLogger | None,
                  epoch: int, finished: bool) -> dict[str, float]:
    """Validate and score --val-voc-root (rank 0), then checkpoint (at the start of the next epoch if this one is
    finished). Only rank 0 needs the numbers: it alone writes checkpoints and picks the best one."""
    val: dict[str, float] = {}
    if ctx.info.is_main:
        val, note = (_validate(ctx, parts) if ctx.val is not None else {}), ""
        if ctx.val_voc is not None:
            value, note = zeroshot_tracking.zeroshot_map(parts.raw, parts.eval_tf, parts.tokenizer, ctx.val_voc,
                                                         ctx.config, ctx.info.device)
            val |= {} if value is None else {"zeroshot_map": value}
        if val or note:
            logger.log(pos.step, "val", epoch=epoch, **{k: v for k, v in val.items() if k != "samples"},
                       **({"note": note} if note else {}))
        zeroshot_tracking.progress_line(epoch, val, pos, ctx.config.train.select_by)
    D.barrier(ctx.info)  # the other ranks wait here while rank 0 evaluates
    if finished and pos.batch_in_epoch < ctx.batches_per_epoch and logger:  # data the epoch did not see
        logger.log(pos.step, "train", epoch=epoch, note=f"epoch ended after {pos.batch_in_epoch} of "
                   f"{ctx.batches_per_epoch} planned micro-batches: a rank's loader ran short")
    if finished:
        pos.epoch, pos.batch_in_epoch = epoch + 1, 0
    pos.record_validation(val.get("loss"), val.get("zeroshot_map"))
    _checkpoint(ctx, parts, opt, pos)
    pos.record_validation(None, None)  # later (periodic) checkpoints hold no validation numbers
    return val


def _validate(ctx: RunContext, parts: Parts) -> dict[str, float]:
    data_cfg = replace(ctx.config.data, augment=False)
    batches = data_loader.make_loader(ctx.val.location, ctx.val.split, data_cfg, parts.eval_tf, parts.tokenizer,
                                      train=False, seed=ctx.config.train.seed, epoch=0)
    ctx.data_report.track(batches)
    rng = S.rng_state()  # validation must not shift the training random stream
    try:
        return validate(parts.raw, batches, device=ctx.info.device,
                        autocast=autocast_for(ctx.config.train.precision, ctx.info.device),
                        max_samples=ctx.config.train.val_max_samples)
    finally:
        S.set_rng_state(*rng)


def _checkpoint(ctx: RunContext, parts: Parts, opt: Optimization, pos: S.Position) -> None:
    """Rank 0 writes RUN/checkpoints/step-N/ (with every rank's random streams) and prunes old ones; the others wait."""
    rngs = D.gather_bytes(S.rng_blob(), ctx.info)  # a collective: every rank takes part
    if ctx.info.is_main:
        root = ctx.run_dir / "checkpoints"
        S.save_train_state(root, model=parts.raw, optimizer=opt.optimizer, scheduler=opt.scheduler,
                           scaler=opt.scaler, position=pos, config=config_to_dict(ctx.config), rank_rngs=rngs[1:])
        S.prune_checkpoints(root, ctx.config.train.keep_checkpoints, ctx.config.train.select_by)
    D.barrier(ctx.info)


def _finish(ctx: RunContext, parts: Parts, pos: S.Position, n_train: int, loss: float, val: dict, seconds: float,
            start_step: int) -> TrainSummary:
    """Save the final weights (rank 0) and summarise the run."""
    best = None
    if ctx.info.is_main:
        save_model(ctx.run_dir, parts.raw, parts.tokenizer, ctx.config)
        best = best_weights.keep_best_weights(ctx.run_dir, ctx.config.train.select_by)  # RUN/best.safetensors
    D.barrier(ctx.info)
    # this session's reads, all ranks: samples skipped by reason, shards that broke off (their URLs)
    reads = ctx.data_report.summary(lambda blob: D.gather_bytes(blob, ctx.info))
    return TrainSummary(
        run_dir=str(ctx.run_dir), steps=pos.step, epochs=pos.epoch, train_samples=n_train,
        samples_seen=pos.samples_seen, final_train_loss=loss, val=val,
        best_val_loss=pos.best_val_loss, best_zeroshot_map=pos.best_zeroshot_map, best=best,
        bad_steps=pos.bad_steps, seconds=seconds,
        steps_this_session=pos.step - start_step, data=str(ctx.data_dir),
        val_data=None if ctx.val is None else str(ctx.val.location),
        val_voc_root=None if ctx.val_voc is None else str(ctx.val_voc.root),
        skipped=reads["skipped"], failed_shards=reads["failed_shards"],
    )

