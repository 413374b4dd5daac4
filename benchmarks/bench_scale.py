"""The whole pipeline at the real datasets' sizes: a cost table per stage, and how each stage grows (issue 23).

Data (benchmarks/scale_data.py, written once per fraction and reused from --workdir): a Visual Genome folder of
108,077 JPEGs at VG's size mix with 5.4 M regions, and a VOC2007 folder of 5,011 trainval + 4,952 test images,
both times --fraction. Stages (benchmarks/scale_stages.py), each the CLI in a subprocess as a user runs it:

  data        write the folders above (reused: its figures are those of the run that wrote it)
  prepare     `vgclip prepare` -> shards (80k train + 8k val at full size, 2 workers)
  train-1     one epoch, `tiny` preset (64 px), 1 process, every training shard, no validation
  train-2     the same with 2 gloo processes (torchrun --standalone)
  validation  `tiny`: one epoch of the first training shard, then validation on every val image
  lit         `offline-small` (locked towers): the LiT feature cache and one epoch on it (--lit-images caps it)
  zeroshot    `vgclip zeroshot` of the train-1 run on the VOC test split, tuning on trainval, plots
  predict     `vgclip predict` on the VOC test images (the report's thresholds)
  serve       `vgclip serve --report` and its threshold page in headless Chromium (scale_browser.py)
  export      `vgclip export` of the train-1 run (open_clip folder)

Per stage: wall_s, cpu_s (the children's user + system), peak_rss_mb (the process tree's summed resident memory,
polled), max_process_rss_mb, bytes_written, the load average and UTC time around it, `items` (the images it
handles) and its own figures. With several fractions (`--fraction 0.01,0.1`, or results of earlier runs kept in
--workdir/results.json) each stage gets growth exponents log(cpu ratio) / log(items ratio) between sizes.

    python benchmarks/bench_scale.py [--fraction 1.0] [--stages prepare,train-1,...] [--workdir DIR]
                                     [--lit-images N] [--workers 2]

Prints one JSON line per fraction on stdout, a readable table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_stages as S  # noqa: E402
from scale_browser import stage_serve  # noqa: E402
from scale_data import sizes  # noqa: E402
from scale_measure import machine_note  # noqa: E402

STAGES = {"data": S.stage_data, "prepare": S.stage_prepare, "train-1": lambda s: S.stage_train(s, 1),
          "train-2": lambda s: S.stage_train(s, 2), "validation": S.stage_validation, "lit": S.stage_lit,
          "zeroshot": S.stage_zeroshot, "predict": S.stage_predict, "serve": stage_serve, "export": S.stage_export}
COLUMNS = ("items", "wall_s", "cpu_s", "peak_rss_mb", "bytes_written")


def exponents(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per stage, log(cpu ratio) / log(items ratio) (and the same for wall) between consecutive fractions."""
    fractions = sorted(results, key=float)
    out: dict[str, dict[str, float]] = {}
    for small, large in zip(fractions, fractions[1:]):
        for stage, b in results[large]["stages"].items():
            a = results[small]["stages"].get(stage)
            if not a or not a.get("items") or not b.get("items") or a["items"] == b["items"]:
                continue
            size = math.log(b["items"] / a["items"])
            key = f"{small}->{large}"
            out.setdefault(stage, {})[key] = round(math.log(max(b["cpu_s"], 1e-3) / max(a["cpu_s"], 1e-3)) / size, 2)
            out[stage][key + " wall"] = round(math.log(max(b["wall_s"], 1e-3) / max(a["wall_s"], 1e-3)) / size, 2)
    return out


def table(fraction: float, stages: dict[str, dict], growth: dict) -> str:
    """The readable table of one fraction."""
    lines = [f"bench_scale at fraction {fraction} ({machine_note()['utc']})",
             f"{'stage':<11}" + "".join(f"{c:>15}" for c in COLUMNS) + "  exponent (cpu)"]
    for name, fig in stages.items():
        grow = ", ".join(f"{k}: {v}" for k, v in growth.get(name, {}).items() if not k.endswith("wall"))
        cells = "".join(f"{fig.get(c, ''):>15}" if c != "bytes_written" else f"{fig.get(c, 0) / 2**20:>13.1f}MB"
                        for c in COLUMNS)
        lines.append(f"{name:<11}{cells}  {grow}  load {fig.get('start', {}).get('load')}")
    return "\n".join(lines)


def run_fraction(fraction: float, names: list[str], workdir: Path, args: argparse.Namespace) -> dict:
    """Every stage asked for at one fraction; its result record."""
    scale = S.Scale(data=workdir / f"data-{fraction}", out=workdir / f"out-{fraction}",
                    sizes={**sizes(fraction), "fraction": fraction}, workers=args.workers,
                    lit_images=args.lit_images, timeout_s=args.stage_timeout, checkpoint=args.checkpoint)
    scale.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for name in names:
        print(f"bench_scale: {name} at {fraction} ...", file=sys.stderr, flush=True)
        done[name] = STAGES[name](scale)
        print(f"bench_scale: {name}: {json.dumps({k: done[name].get(k) for k in COLUMNS})}", file=sys.stderr,
              flush=True)
    return {"benchmark": "scale", "fraction": fraction, "sizes": scale.sizes, "cpus": _cpus(),
            "evaluated_run": str(scale.trained), "omp_num_threads": S.ENV.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "stages": done}


def _cpus() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        return f"{len(names)} x {names[0]}" if names else platform.processor()
    except OSError:
        return platform.processor()


def _stage_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise SystemExit(f"bench_scale: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    return [n for n in STAGES if n in names]  # dependency order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", default="1.0", help="fraction(s) of the real sizes, e.g. 0.01,0.1")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of: {', '.join(STAGES)}")
    parser.add_argument("--workdir", type=Path, help="keep data and outputs here and reuse written data "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--lit-images", type=int, help="cap on the LiT stage's training images (whole shards)")
    parser.add_argument("--workers", type=int, default=2, help="prepare / zeroshot worker processes")
    parser.add_argument("--checkpoint", type=Path, help="the run zeroshot, predict, serve and export load "
                        "(default: this fraction's train-1 run; their cost does not depend on its training size)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every stage (default: unset, as a user "
                        "runs it; on an oversubscribed machine 1 keeps torch's threads from spinning)")
    parser.add_argument("--stage-timeout", type=float, help="kill a stage after this many seconds")
    args = parser.parse_args()
    names = _stage_list(args.stages)
    if args.threads:
        S.ENV["OMP_NUM_THREADS"] = str(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "results.json"
    try:
        for fraction in (float(f) for f in args.fraction.split(",")):
            record = run_fraction(fraction, names, workdir, args)
            results = json.loads(store.read_text()) if store.is_file() else {}  # re-read: another run may add
            previous = results.get(str(fraction), {}).get("stages", {})
            results[str(fraction)] = {**record, "stages": {**previous, **record["stages"]}}
            store.write_text(json.dumps(results, indent=1))
            growth = exponents(results)
            record["exponents"] = {k: v for k, v in growth.items() if k in record["stages"]}
            print(json.dumps(record), flush=True)
            print(table(fraction, record["stages"], growth), file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
