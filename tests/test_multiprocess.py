"""The multi-process harness itself (tests/_multiprocess.py): a good run returns every rank's result, and a
rank that raises, dies of a signal, crashes in its teardown or hangs fails the test with a clear message."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist

from tests._multiprocess import Launcher, run_gloo_workers


def _sum_of_ranks(rank: int, scale: float) -> dict:
    dist.init_process_group("gloo")  # from the variables the harness sets, as under torchrun
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item() * scale,
            "grad": torch.ones(2) * rank, "threads": torch.get_num_threads()}


def test_a_good_run_returns_every_ranks_result_in_rank_order():
    got = run_gloo_workers(_sum_of_ranks, 2, args=(2.0,))
    assert [(g["rank"], g["world"], g["sum"], g["threads"]) for g in got] == [(0, 2, 6.0, 1), (1, 2, 6.0, 1)]
    assert all(torch.equal(g["grad"], torch.ones(2) * r) for r, g in enumerate(got))  # tensors come by value


def _raises_on_rank_1(rank: int) -> None:
    dist.init_process_group("gloo")
    if rank == 1:
        raise ValueError("rank 1 found a bad value")
    dist.barrier()  # rank 0 waits here for a peer that never comes: the harness must not wait it out


def test_a_raising_rank_fails_with_its_traceback_and_does_not_wait_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 1 raised:.*_raises_on_rank_1.*ValueError: rank 1 found"):
        run_gloo_workers(_raises_on_rank_1, 2, timeout=120)
    assert time.monotonic() - start < 60


def _aborts_on_rank_0(rank: int) -> None:
    dist.init_process_group("gloo")
    if rank == 0:
        os.abort()  # SIGABRT, as "terminate called without an active exception" ends a process
    dist.barrier()


def test_a_rank_killed_by_a_signal_fails_with_the_signal():
    with pytest.raises(AssertionError, match="rank 0 was killed by SIGABRT before it reported a result"):
        run_gloo_workers(_aborts_on_rank_0, 2, timeout=120)


def _crashes_in_teardown(rank: int) -> int:
    dist.init_process_group("gloo")
    if rank == 1:
        # The harness leaves the group after the result went out: a crash there is still a failure.
        dist.destroy_process_group = os.abort
    return rank


def test_a_rank_that_crashes_after_reporting_still_fails():
    with pytest.raises(AssertionError, match="rank 1 was killed by SIGABRT after it reported its result"):
        run_gloo_workers(_crashes_in_teardown, 2, timeout=120)


def _hangs(rank: int) -> None:
    time.sleep(600)


def test_a_hanging_run_fails_at_the_timeout():
    with pytest.raises(AssertionError, match=r"rank\(s\) \[0, 1\] did not finish within 8 s"):
        run_gloo_workers(_hangs, 2, timeout=8)


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its reaper."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return check()


def test_launcher_kills_every_process_group_it_started(tmp_path):
    child = tmp_path / "child.pid"
    # A parent that starts a child (in its process group, as torchrun starts ranks) and then sleeps.
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(child)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    with Launcher(tmp_path / "logs") as launcher:
        quick = launcher.start([sys.executable, "-c", "print('done')"], env=dict(os.environ))
        slow = launcher.start([sys.executable, "-c", code], env=dict(os.environ))
        assert launcher.wait([quick], timeout=60)[0].stdout == "done\n"
        assert _wait_for(lambda: child.is_file() and child.read_text())
        with pytest.raises(AssertionError, match=r"1 process\(es\) still running after 2 s"):
            launcher.wait([slow], timeout=2)
    assert slow.returncode == -signal.SIGKILL
    assert _wait_for(lambda: _gone(int(child.read_text())), timeout=10)  # the grandchild went with its group
