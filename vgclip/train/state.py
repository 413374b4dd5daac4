"""Resumable training state: RUN/checkpoints/step-N/ written atomically, loaded without unpickling.

Layout of one checkpoint folder:
    model.safetensors      model weights
    optimizer.safetensors  optimizer state tensors, keys "state.<param index>.<name>"
    rng.safetensors        torch / CUDA / numpy generator states as tensors (rank 0, or the one process)
    rng-rank{r}.safetensors  the same for rank r >= 1 of a distributed run (each rank seeds its own
                           dropout masks), with its JSON part (python RNG, numpy scalars) in the file's metadata
    state.json             everything else: optimizer param groups and scalar state, scheduler,
                           grad scaler, python RNG, data position, step, val loss, resolved config
Tensors only ever go through safetensors and the rest through JSON, so loading a checkpoint can
never execute code hidden in a pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vgclip.errors import VgclipError

STATE_FILE = "state.json"
logger = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: completed optimizer steps and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches (micro-batches) already consumed in `epoch`
    samples_seen: int = 0
    bad_steps: int = 0
    best_val_loss: float | None = None
    val_loss: float | None = None  # at this checkpoint, if validation ran just before it
    best_zeroshot_map: float | None = None  # highest mAP on --val-voc-root so far (zeroshot_tracking.py)
    zeroshot_map: float | None = None  # at this checkpoint, if --val-voc-root was scored just before it

    def record_validation(self, val_loss: float | None, zeroshot_map: float | None) -> None:
        """This epoch's numbers (saved with the next checkpoint) and the run's best so far."""
        self.val_loss, self.zeroshot_map = val_loss, zeroshot_map
        if is_better("val_loss", val_loss, self.best_val_loss):
            self.best_val_loss = val_loss
        if is_better("zeroshot_map", zeroshot_map, self.best_zeroshot_map):
            self.best_zeroshot_map = zeroshot_map


# train.select_by -> whether a higher value is better; a checkpoint's state.json holds the value in
# position[<the same name>] (validation loss, zero-shot mAP on --val-voc-root).
HIGHER_IS_BETTER = {"val_loss": False, "zeroshot_map": True}


def is_better(select_by: str, value: float | None, best: float | None) -> bool:
    """Whether `value` beats `best` by `select_by` (ties keep the earlier one; missing or non-finite never wins)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[select_by] else value < best


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone so tensors that share storage (tied weights, views) can be stored independently.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    return _tensors(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of `optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator the loop touches: torch (CPU, CUDA), numpy, python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    rest = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return _tensors(tensors), rest


def rng_blob() -> bytes:
    """This process's `rng_state` as the bytes of one safetensors file (the JSON part in its metadata):
    what a rank sends to rank 0 to be written as rng-rank{r}.safetensors."""
    from safetensors.torch import save

    tensors, rest = rng_state()
    return save(tensors, metadata={"rng": json.dumps(rest)})


def _rank_rng_state(ckpt: Path, doc: dict, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The random streams rank `rank` saved in `ckpt`."""
    from safetensors import safe_open

    path = ckpt / f"rng-rank{rank}.safetensors"
    if rank > 0 and path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads((fh.metadata() or {})["rng"])
    if rank > 0:  # saved by a run with fewer processes: not an exact continuation anyway
        logger.warning("%s holds no random state for rank %d: it continues rank 0's streams", ckpt, rank)
    return load_file(str(ckpt / "rng.safetensors")), doc["rng"]


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    """Restore what `rng_state` captured (CUDA states only if the devices are there)."""
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = rest["python"]
    random.setstate((version, tuple(state), py_gauss))


def save_train_state(
    ckpt_root: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    position: Position,
    config: dict,
    rank_rngs: Sequence[bytes] = (),
) -> Path:
    """Write RUN/checkpoints/step-N/ atomically: build it in a temp folder, then rename it into place.

    `rank_rngs`: the `rng_blob()` of ranks 1, 2, ... of a distributed run (this process is rank 0).
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{position.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{position.step}.", dir=ckpt_root))
    try:
        save_file(_tensors(model.state_dict()), str(tmp / "model.safetensors"))
        opt_tensors, opt_rest = optimizer_to_flat(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_rest = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for rank, blob in enumerate(rank_rngs, start=1):
            (tmp / f"rng-rank{rank}.safetensors").write_bytes(blob)
        doc = {
            "position": asdict(position),
            "optimizer": opt_rest,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
            "rng": rng_rest,
            "config": config,
        }
        (tmp / STATE_FILE).write_text(json.dumps(doc), encoding="utf-8")
        old = None
        if final.exists():  # e.g. epoch end falls on a periodic checkpoint step: replace it
            # A folder cannot be renamed over a non-empty one: move the old one aside first, so
            # the window without a step-N folder is two renames long, not a whole delete.
            old = Path(tempfile.mkdtemp(prefix=f".old-step-{position.step}.", dir=ckpt_root))
            os.replace(final, old / "ckpt")
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_train_state(
    ckpt: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rank: int = 0,
) -> Position:
    """Load a checkpoint folder into freshly built objects; restore this rank's RNGs; return the data position."""
    try:
        doc = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        opt = optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")), doc["optimizer"])
        optimizer.load_state_dict(opt)
        _match_param_layout(optimizer)
        scheduler.load_state_dict(doc["scheduler"])
        if scaler is not None and scaler.is_enabled() and doc["scaler"]:
            scaler.load_state_dict(doc["scaler"])
        set_rng_state(*_rank_rng_state(ckpt, doc, rank))
        return Position(**doc["position"])
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise VgclipError(f"{ckpt}: not a usable training checkpoint ({exc})") from None


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every restored state tensor (exp_avg, ...) the memory layout of its parameter.

    safetensors stores tensors contiguous, so channels_last conv weights get contiguous moments back;
    the fused AdamW kernel walks parameter and state with the same flat index and would then pair
    the wrong elements (seen as a resumed run drifting from an uninterrupted one).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (those with state.json), oldest step first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*")
             if p.name[5:].isdigit() and p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def resolve_resume(run_dir: Path, resume: str | Path) -> Path:
    """'latest' -> the newest checkpoint of RUN; otherwise a checkpoint folder (or a run folder)."""
    if str(resume) == "latest":
        found = list_checkpoints(run_dir / "checkpoints")
        if not found:
            raise VgclipError(f"--resume latest: no checkpoint in {run_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path / "checkpoints")
    if found:
        return found[-1]
    raise VgclipError(f"--resume {path}: not a checkpoint folder (no {STATE_FILE}) nor a run with checkpoints")


def best_checkpoint(ckpt_root: Path, select_by: str = "val_loss") -> tuple[Path, float] | None:
    """(checkpoint, its value) of the best checkpoint by `select_by` (train.select_by), or None if none has one."""
    best: tuple[Path, float] | None = None
    for path in list_checkpoints(ckpt_root):
        value = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["position"].get(select_by)
        if is_better(select_by, value, None if best is None else best[1]):
            best = (path, value)
    return best


def prune_checkpoints(ckpt_root: Path, keep: int, select_by: str = "val_loss") -> None:
    """Keep the newest `keep` checkpoints plus the best one by `select_by` (train.select_by)."""
    found = list_checkpoints(ckpt_root)
    keep_set = set(found[-keep:]) if keep > 0 else set()
    best = best_checkpoint(ckpt_root, select_by)
    if best is not None:
        keep_set.add(best[0])
    for path in found:
        if path not in keep_set:
            shutil.rmtree(path, ignore_errors=True)
