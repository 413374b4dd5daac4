"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._train_fixtures import ToyClip, toy_batches, write_shards
from vgclip.config import TrainConfig, load_config
from vgclip.errors import VgclipError
from vgclip.train import state as S
from vgclip.train.loop import train
from vgclip.train.optim import build_optimizer, build_scheduler

OVERRIDES = ["train.checkpoint_every=2", "train.epochs=1", "train.keep_checkpoints=1", "data.num_workers=0",
             "train.warmup_steps=2"]


def _train_cmd(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vgclip.cli", "train", "--data", str(shards), "--out", str(run),
            "--config", "tiny", *extra, *OVERRIDES]


def _env() -> dict[str, str]:
    # Same thread count in every process: float reductions then run in the same order (bit-identical).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    shards = write_shards(tmp_path / "shards", n_train=48, n_val=8)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(shards, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = killed / "checkpoints" / "step-2" / "state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed: {err[-2000:]}"
    assert not (killed / "model.safetensors").exists()  # really interrupted mid-run
    latest = S.list_checkpoints(killed / "checkpoints")[-1]
    position = json.loads((latest / "state.json").read_text())["position"]
    assert position["epoch"] == 0 and 0 < position["batch_in_epoch"] < 6  # mid-epoch

    resumed = subprocess.run(_train_cmd(shards, killed, "--resume", "latest"), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["steps_this_session"] == 6 - position["step"]

    # The uninterrupted reference runs in this process (saves a start-up), on one thread like the others.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config("tiny", OVERRIDES), shards, tmp_path / "straight")
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(killed / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # The resumed metrics.csv holds each step once.
    steps = [line.split(",")[0] for line in (killed / "metrics.csv").read_text().splitlines()[1:]
             if ",train," in line]
    assert steps == [str(i) for i in range(1, 7)]


def _toy_training_state(steps: int):
    torch.manual_seed(0)
    model = ToyClip()
    cfg = TrainConfig(lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    for images, tokens in toy_batches(steps, batch=4):
        out = model(images, tokens)
        (out["image_embeds"] @ out["text_embeds"].T).diagonal().sum().neg().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched, cfg


def test_state_round_trip_restores_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched, cfg = _toy_training_state(3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pos = S.Position(step=3, epoch=1, batch_in_epoch=2, samples_seen=12)
    torch.manual_seed(7)
    ckpt = S.save_train_state(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=scaler, position=pos,
                              config={"train": {"lr": 0.01}})
    expected_draw = torch.rand(3)
    assert not list(tmp_path.glob(".step-*"))  # the temp folder was renamed, not left behind

    fresh, fresh_opt, fresh_sched, _ = _toy_training_state(0)
    torch.manual_seed(99)
    got = S.load_train_state(ckpt, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, scaler=scaler)
    assert got == pos
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert fresh_sched.state_dict() == sched.state_dict()
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx, values in a["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][name])), (idx, name)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_files_hold_no_pickles(tmp_path):
    model, opt, sched, _ = _toy_training_state(1)
    ckpt = S.save_train_state(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=None,
                              position=S.Position(step=1), config={})
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    json.loads((ckpt / "state.json").read_text())  # plain JSON


def test_prune_keeps_newest_and_best(tmp_path):
    model, opt, sched, _ = _toy_training_state(0)
    for step, val in ((1, 0.5), (2, 0.2), (3, 0.9), (4, None), (5, 0.7)):
        S.save_train_state(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=None,
                           position=S.Position(step=step, val_loss=val), config={})
    S.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in S.list_checkpoints(tmp_path)] == ["step-2", "step-4", "step-5"]


def test_resolve_resume_errors_name_the_folder(tmp_path):
    with pytest.raises(VgclipError, match="no checkpoint"):
        S.resolve_resume(tmp_path, "latest")
    with pytest.raises(VgclipError, match="not a checkpoint"):
        S.resolve_resume(tmp_path, tmp_path / "nope")


def test_resolve_resume_accepts_latest_a_checkpoint_or_a_run(tmp_path):
    model, opt, sched, _ = _toy_training_state(0)
    for step in (3, 12):  # numeric, not lexical, order: step-12 is newer than step-3
        S.save_train_state(tmp_path / "run" / "checkpoints", model=model, optimizer=opt, scheduler=sched,
                           scaler=None, position=S.Position(step=step), config={})
    newest = tmp_path / "run" / "checkpoints" / "step-12"
    assert S.resolve_resume(tmp_path / "run", "latest") == newest
    assert S.resolve_resume(tmp_path / "elsewhere", str(tmp_path / "run")) == newest
    older = tmp_path / "run" / "checkpoints" / "step-3"
    assert S.resolve_resume(tmp_path / "elsewhere", str(older)) == older
