"""Start and tear down the multi-process tests' process groups in one safe order (issue 21.3).

Two kinds of group:

* `run_gloo_workers(fn, world_size, args)`: `fn(rank, *args)` in spawned processes that join a gloo group
  from torchrun's variables; their return values come back in rank order.
* `Launcher`: whole commands (torchrun, or the CLI with torchrun's variables) in their own process groups,
  with a deadline and a guaranteed kill of every group at the end of the test.

Why a spawned gloo worker must not end through the interpreter's normal exit: gloo's worker threads
(`pt_gloo_runloop`) complete a collective's future first and drop their own reference to the work, and
so to its tensors, a moment later (`ProcessGroupGloo::runLoop`). When that is the last reference to a
tensor made in Python, the gloo thread frees its Python object and takes the GIL to do so. If the
interpreter has begun finalizing before that thread gets the GIL, CPython ends the thread with
`PyThread_exit_thread()`, the unwind crosses a `noexcept` frame, and the process aborts with "terminate
called without an active exception" (pytorch/pytorch#190489, #179291). `destroy_process_group()` would
join those threads first, but could not: `torch.distributed.nn.functional`, first imported after
`init_process_group` (as `vgclip.model.loss` imported it until issue 21.3), binds the live group as its
functions' default `group=` argument, so the group and its threads outlived `destroy_process_group()` and ran
on into interpreter shutdown. A gloo thread descheduled under load long enough lands in that window: a rank
that had put its results on the queue died of SIGABRT. `vgclip.model.loss` now imports it before any group
exists (`tests/model/test_loss.py` checks that no gloo thread survives teardown); the harness below also ends its
ranks without interpreter shutdown, so no other module doing the same can make a test fail by chance.

So each rank here: runs `fn` -> reports its result (or its traceback) through a pipe, written before the
call returns (an `mp.Queue` flushes from a background thread) -> waits until every rank has reported (no
peer is then inside a collective) -> `destroy_process_group()` -> `os._exit(0)`, which ends the process
without interpreter finalization, as the fork start method ends its children. A rank that raises, dies
of a signal (before or after reporting) or runs past the deadline still fails the test, with its
traceback, exit code or signal.

Ports: the test process holds a TCPStore server on a port the kernel picks (port 0) and the ranks join it
as clients (`TORCHELASTIC_USE_AGENT_STORE`, as torchrun's workers join their agent's store), so no port
is chosen, released and bound later by a rank, with another process free to take it in between.
`Launcher.store()` serves torchrun launchers the same way, as their c10d rendezvous endpoint.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
_GO = b"go"
FAILURE_GRACE_S = 5.0


def agent_store(world_size: int | None = None):
    """A TCPStore server on 127.0.0.1, on a port the kernel picks (`.port`), for ranks started with
    `rank_env` or as a rendezvous endpoint. Keep it referenced while they run: dropping it stops the server."""
    from torch.distributed import TCPStore

    return TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)


def rank_env(rank: int, world_size: int, store) -> dict[str, str]:
    """torchrun's variables for `rank`, with `store` (from `agent_store`) as the agent's store."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": HOST,
            "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def exit_text(code: int | None) -> str:
    """How a process ended, in words: 'exited with code 1', 'was killed by SIGABRT'."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ----------------------------------------------------------------------------------------------------
# gloo workers


def _leave(code: int) -> None:
    """End this rank without interpreter finalization (see the module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker_main(fn: Callable[..., Any], rank: int, env: dict[str, str], args: tuple, conn: Connection) -> None:
    """One rank: fn, report, wait for the others' reports, leave the process group, exit."""
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores shared by every rank; also the reference runs' reduction order
    try:
        result = fn(rank, *args)
        # Plain pickle: tensors travel by value; torch's reducers would share memory with a process
        # that exits right after.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - any failure of fn goes to the test, as text
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        finally:
            _leave(1)
    try:
        conn.recv_bytes()  # every rank has reported: none is inside a collective with this one
    except EOFError:  # the test process is gone
        _leave(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    _leave(0)


def _poll_rank(rank: int, proc, conn: Connection) -> tuple[str, Any] | None:
    """("ok", result) or ("failed", why) once `rank` has reported or died; None while it runs."""
    # The pipe first: a rank may report and then die. A closed pipe means the rank is ending.
    if conn.poll():
        try:
            status, value = pickle.loads(conn.recv_bytes())
        except EOFError:
            proc.join(10)
            return "failed", f"rank {rank} {exit_text(proc.exitcode)} before it reported a result"
        return ("failed", f"rank {rank} raised:\n{value}") if status == "error" else ("ok", value)
    if not proc.is_alive():
        return "failed", f"rank {rank} {exit_text(proc.exitcode)} before it reported a result"
    return None


def _collect(procs: list, conns: list[Connection], deadline: float, timeout: float) -> list[Any]:
    """Every rank's result, in rank order. After a first failure the others get FAILURE_GRACE_S to
    report theirs (a peer of a failed rank often fails too, in gloo); AssertionError with all of them,
    the first first."""
    results: list[Any] = [None] * len(procs)
    pending, failures = set(range(len(procs))), []
    end = deadline
    while pending and time.monotonic() < end:
        wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=end - time.monotonic())
        for rank in sorted(pending):
            outcome = _poll_rank(rank, procs[rank], conns[rank])
            if outcome is None:
                continue
            pending.discard(rank)
            if outcome[0] == "ok":
                results[rank] = outcome[1]
            else:
                failures.append(outcome[1])
                end = min(end, time.monotonic() + FAILURE_GRACE_S)
    if failures:
        raise AssertionError("\n\n".join(failures))
    if pending:
        raise AssertionError(f"rank(s) {sorted(pending)} did not finish within {timeout:g} s")
    return results


def _release(procs: list, conns: list[Connection], deadline: float) -> None:
    """Let every rank leave; each must then exit with code 0 (a crash in its teardown fails too)."""
    for conn in conns:
        try:
            conn.send_bytes(_GO)
        except OSError:  # that rank is already gone: its exit code says how
            pass
    for rank, proc in enumerate(procs):
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.exitcode != 0:
            raise AssertionError(f"rank {rank} {exit_text(proc.exitcode)} after it reported its result")


def run_gloo_workers(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                     timeout: float = 300.0) -> list[Any]:
    """Run `fn(rank, *args)` in `world_size` spawned processes; their return values, in rank order.

    Each process has torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT of a store this
    process serves) and one torch thread; `fn` joins the group itself (`dist.init_process_group("gloo")`
    or the code under test). Return values must pickle. The test fails with the rank's traceback if one
    raises, with its exit code or signal if one dies, and when `timeout` seconds pass; every process
    still running is killed on the way out."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    deadline = time.monotonic() + timeout
    store = agent_store(world_size)
    procs, conns = [], []
    try:
        for rank in range(world_size):
            ours, theirs = ctx.Pipe()
            # Not daemonic: a rank may start its own children (data loader workers).
            proc = ctx.Process(target=_worker_main, name=f"gloo-rank{rank}",
                               args=(fn, rank, rank_env(rank, world_size, store), tuple(args), theirs))
            proc.start()
            theirs.close()  # so that a dead rank's pipe reads as closed
            procs.append(proc)
            conns.append(ours)
        results = _collect(procs, conns, deadline, timeout)
        _release(procs, conns, deadline)
        return results
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(30)
        for conn in conns:
            conn.close()
        del store  # stops the store's server


# ----------------------------------------------------------------------------------------------------
# launched commands (torchrun, the CLI)


@dataclass
class Finished:
    """A launched command's end: its return code and what it wrote."""

    returncode: int
    stdout: str
    stderr: str


class Launcher:
    """Commands started in their own sessions, output to files (a full pipe cannot stall a rank that a
    peer waits on); at the end every process group still running is killed, even when the test fails
    first. Use as a context manager."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        self._stores: list = []

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
        self._stores.clear()  # stops their servers, now that no process is left to use them

    def store(self, world_size: int | None = None):
        """An `agent_store` that lives as long as this launcher (its processes may use it to the end)."""
        self._stores.append(agent_store(world_size))
        return self._stores[-1]

    def start(self, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `cmd` in a new session (its own process group, torchrun's workers included)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        n = len(self.procs)
        with open(self.logs / f"{n}.out", "wb") as out, open(self.logs / f"{n}.err", "wb") as err:
            proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=err, start_new_session=True)
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> tuple[str, str]:
        """What `proc` has written so far to stdout and stderr."""
        n = self.procs.index(proc)
        out, err = ((self.logs / f"{n}.{kind}").read_text(errors="replace") for kind in ("out", "err"))
        return out, err

    def wait(self, procs: Sequence[subprocess.Popen], timeout: float) -> list[Finished]:
        """Wait for every one of `procs`; AssertionError naming those still running after `timeout` s
        (their groups are killed, with the tail of their stderr in the message)."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late = [p for p in procs if p.poll() is None]
                tails = "\n".join(f"--- {p.args[:4]}...:\n{self.output(p)[1][-2000:]}" for p in late)
                self.kill_all()
                raise AssertionError(f"{len(late)} process(es) still running after {timeout:g} s:\n{tails}") from None
        return [Finished(p.returncode, *self.output(p)) for p in procs]

    def kill_all(self) -> None:
        """SIGKILL the process group of every process not yet reaped, then reap it."""
        for proc in self.procs:
            # Only while the leader is unreaped: its pid, hence the group id, cannot belong to anyone else.
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
