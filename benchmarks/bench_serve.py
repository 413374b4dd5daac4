"""Served predict throughput: N concurrent clients against `vgclip serve` beside offline `predict`, one run.

Both sides score the same images against the 20 VOC classes with the same run:
  offline: vgclip.eval.tagging.predict (what `vgclip predict` runs) on the image files, in this process;
  served:  `vgclip serve` started as a real uvicorn server on 127.0.0.1; N client threads post one image per
           request to /api/predict until every image has been sent (bounded in count and in time).
Rounds alternate between the two sides; the best round of each counts (the machine may be shared).
Prints one JSON line: images/s of each side and served/offline (target >= 0.8 with 16 clients), requests/s,
p50/p95 latency, error count, and the server's resident memory before and after the load.

The run is --checkpoint, else the offline-small towers (packaged pretrained weights, random projections:
the scores mean nothing, the cost is a real model's) saved to a temporary run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/voc2012-sample/VOCdevkit/VOC2012/JPEGImages"
STARTUP_LIMIT_S = 300


def images_for(count: int, folder: Path) -> list[Path]:
    """`count` JPEG files: the real VOC sample (cycled), else synthetic noise photos written to `folder`."""
    from PIL import Image

    real = sorted(SAMPLE.glob("*.jpg")) if SAMPLE.is_dir() else []
    if real:
        return [real[i % len(real)] for i in range(count)]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"synthetic-{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_run(folder: Path, config: str) -> Path:
    """A run folder with the `config` preset's towers (saved as `vgclip train` saves them)."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    cfg = vgclip.load_config(config)
    model, _, tokenizer = vgclip.create_model(cfg)
    save_model(folder, model, tokenizer, cfg)
    return folder


def offline_round(loaded: tuple, paths: list[Path], labels: list[str], crops: str) -> float:
    """Images/s of `predict` (model already loaded: the load is not part of either side's time), with the
    crops the server uses (the run's eval.crops)."""
    from vgclip.eval.tagging import predict

    model, transform, tokenizer = loaded
    start = time.perf_counter()
    predict(model, transform, tokenizer, paths, labels, score="softmax", templates="single", crops=crops)
    return len(paths) / (time.perf_counter() - start)


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    """`vgclip serve` on 127.0.0.1:port, waited for (bounded) through /api/health."""
    import httpx2

    proc = subprocess.Popen([sys.executable, "-m", "vgclip.cli", "serve", "--checkpoint", str(run), "--port", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx2.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"vgclip serve did not start:\n{log.read_text(errors='replace')[-3000:]}")


def served_round(base: str, bodies: list[tuple[str, bytes]], labels: list[str], clients: int,
                 time_limit_s: float) -> dict:  # fmt: skip
    """N client threads share the images (one per request); latency per request, errors counted."""
    import httpx2

    deadline = time.monotonic() + time_limit_s
    text = ",".join(labels)

    def client(index: int) -> tuple[list[float], int, int]:
        latencies, errors, sent = [], 0, 0
        with httpx2.Client(base_url=base, timeout=120) as http:
            for name, data in bodies[index::clients]:
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                try:
                    ok = http.post("/api/predict", files=[("images", (name, data))], data={"labels": text}).status_code == 200
                except httpx2.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok
                sent += 1
        return latencies, errors, sent

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies = np.array([x for lat, _, _ in parts for x in lat])
    sent = sum(s for _, _, s in parts)
    errors = sum(e for _, e, _ in parts)
    return {"images_per_s": (sent - errors) / wall, "requests_per_s": sent / wall, "requests": sent, "errors": errors,
            "p50_ms": float(np.percentile(latencies, 50) * 1000), "p95_ms": float(np.percentile(latencies, 95) * 1000)}


def main() -> None:
    import httpx2

    import vgclip
    from vgclip.data.voc import STANDARD_CLASSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained run (default: offline-small towers)")
    parser.add_argument("--config", default="offline-small", help="preset for the default run (e.g. tiny)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per served round at most")
    args = parser.parse_args()
    labels = list(STANDARD_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.checkpoint or make_run(Path(tmp) / "run", args.config)
        paths = images_for(args.images, Path(tmp))
        bodies = [(p.name, p.read_bytes()) for p in paths]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(run, port, Path(tmp) / "serve.log")
        base = f"http://127.0.0.1:{port}"
        try:
            served_round(base, bodies[: args.clients * 2], labels, args.clients, args.time_limit)  # warm-up
            loaded = vgclip.load_checkpoint(run)
            crops = httpx2.get(f"{base}/api/labels").json()["crops"]  # what the server scores with
            offline_round(loaded, paths[:8], labels, crops)  # warm-up
            rss_before = httpx2.get(f"{base}/api/health").json()["rss_bytes"]
            offline, served = [], []
            for _ in range(args.rounds):
                offline.append(offline_round(loaded, paths, labels, crops))
                served.append(served_round(base, bodies, labels, args.clients, args.time_limit))
            health = httpx2.get(f"{base}/api/health").json()
        finally:
            proc.send_signal(2)
            proc.wait(timeout=60)
    best = max(served, key=lambda r: r["images_per_s"])
    print(json.dumps({
        "benchmark": "serve", "images": len(paths), "clients": args.clients, "labels": len(labels),
        "rounds": args.rounds, "run": str(args.checkpoint or f"{args.config} towers (untrained projections)"),
        "crops": crops,
        "offline_images_per_s": round(max(offline), 2), "served_images_per_s": round(best["images_per_s"], 2),
        "served_vs_offline": round(best["images_per_s"] / max(offline), 3),
        "requests_per_s": round(best["requests_per_s"], 2), "p50_ms": round(best["p50_ms"], 1),
        "p95_ms": round(best["p95_ms"], 1), "errors": sum(r["errors"] for r in served),
        "server_rss_mb_before": round(rss_before / 2**20, 1), "server_rss_mb_after": round(health["rss_bytes"] / 2**20, 1),
        "server_batches": health["batches"], "server_batched_images": health["batched_images"],
        "offline_rounds": [round(x, 2) for x in offline], "served_rounds": [round(r["images_per_s"], 2) for r in served],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
