"""What one bench_scale stage costs: wall and CPU seconds, peak memory and bytes written by a child command.

A stage is a command run as a user runs it (a subprocess). While it runs, the resident memory of its whole
process tree (the command, its workers, torchrun's ranks) is summed from /proc every POLL_S seconds: the peak of
that sum is `peak_rss_mb` and the largest single process seen is `max_process_rss_mb` (a spike shorter than the
polling interval can be missed). CPU seconds are the getrusage(RUSAGE_CHILDREN) user + system delta over the
stage: every descendant that was waited for, i.e. all of them once the command has exited.
"""

from __future__ import annotations

import datetime
import os
import resource
import subprocess
import time
from pathlib import Path

POLL_S = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(summed, largest) resident bytes of `root` and all its descendants now."""
    children = _children_map()
    todo, total, largest = [root], 0, 0
    while todo:
        pid = todo.pop()
        rss = _rss_bytes(pid)
        total, largest = total + rss, max(largest, rss)
        todo.extend(children.get(pid, ()))
    return total, largest


def disk_bytes(paths: list[Path]) -> int:
    """Bytes of the files under `paths` (files or folders; missing ones count 0)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return total


def machine_note() -> dict:
    """UTC time and load averages, recorded beside every figure (the machine is shared)."""
    load = os.getloadavg()
    return {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load": [round(x, 2) for x in load]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def watch(proc: subprocess.Popen, timeout_s: float | None = None) -> dict:
    """Poll `proc`'s process tree until it exits (killed after `timeout_s`); its peak memory and exit code."""
    peak = largest = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while proc.poll() is None:
        total, big = tree_rss(proc.pid)
        peak, largest = max(peak, total), max(largest, big)
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
        time.sleep(POLL_S)
    return {"rc": proc.returncode, "peak_rss_mb": round(peak / 2**20, 1), "max_process_rss_mb": round(largest / 2**20, 1)}


def run_stage(command: list[str], log: Path, outputs: list[Path], env: dict | None = None,
              stdout: Path | None = None, timeout_s: float | None = None) -> dict:
    """Run `command` (stderr, and stdout unless `stdout` names a file, into `log`); its costs as a dict."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = machine_note()
    cpu0, start = _cpu_seconds(), time.perf_counter()
    with open(log, "wb") as err:
        out = open(stdout, "wb") if stdout else None
        try:
            proc = subprocess.Popen(command, stdout=out or err, stderr=err, env=env)
            seen = watch(proc, timeout_s)
        finally:
            if out:
                out.close()
    figures = {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(_cpu_seconds() - cpu0, 2),
               "peak_rss_mb": seen["peak_rss_mb"], "max_process_rss_mb": seen["max_process_rss_mb"],
               "bytes_written": disk_bytes(outputs), "rc": seen["rc"], "start": before, "end": machine_note()}
    return figures


def log_tail(log: Path, chars: int = 3000) -> str:
    """The end of a stage's log, for a failure message."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
