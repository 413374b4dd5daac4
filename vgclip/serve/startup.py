"""Starting `vgclip serve`: load the run once, read the report, pick default labels and thresholds, run uvicorn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgclip.errors import VgclipError


@dataclass(frozen=True)
class ServeSetup:
    """What `vgclip serve` was asked to serve."""

    checkpoint: Path
    report: Path | None = None
    thresholds: Path | None = None
    voc_root: Path | None = None
    save_thresholds: Path | None = None
    device: str | None = None
    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_batch: int = 32
    batch_wait_ms: float = 5.0


def default_options(setup: ServeSetup) -> Any:
    """Labels, score kind, templates and thresholds the pages start with: the thresholds file's (given, or the
    report's thresholds.json), else the 20 VOC classes with the run's eval settings."""
    from vgclip.data.voc import STANDARD_CLASSES
    from vgclip.eval.predict import predict_settings
    from vgclip.eval.thresholds import load_thresholds
    from vgclip.serve.app import ServeOptions

    file = setup.thresholds
    if file is None and setup.report is not None and (setup.report / "thresholds.json").is_file():
        file = setup.report / "thresholds.json"
    labels, source = list(STANDARD_CLASSES), "the 20 VOC classes"
    if file is not None:
        labels, source = list(load_thresholds(file).get("classes") or []), str(file)
        if not labels:
            raise VgclipError(f"{file}: lists no classes")
    chosen = predict_settings(setup.checkpoint, labels, thresholds_file=file)
    limits = dict(zip(labels, chosen["thresholds"])) if chosen["thresholds"] else None
    if setup.max_upload_mb <= 0 or setup.max_pixels <= 0:
        raise VgclipError("--max-upload-mb and --max-pixels must be positive")
    return ServeOptions(labels, chosen["score"], chosen["templates"], limits, chosen["texts"], source, chosen["crops"],
                        max_upload_bytes=int(setup.max_upload_mb * 1024 * 1024), max_pixels=setup.max_pixels,
                        info={"checkpoint": str(setup.checkpoint)})  # fmt: skip


def build_app(setup: ServeSetup) -> Any:
    """The FastAPI app with the model loaded (once) and the report read."""
    import vgclip
    from vgclip.serve.app import create_app
    from vgclip.data.views import eval_transform
    from vgclip.serve.engine import ScoringEngine
    from vgclip.serve.report import load_report

    if not Path(setup.checkpoint).exists():
        raise VgclipError(f"{setup.checkpoint}: no such run folder or checkpoint")
    options = default_options(setup)
    report = None
    if setup.report is not None:
        report = load_report(setup.report, save_path=setup.save_thresholds, voc_root=setup.voc_root)
    model, transform, tokenizer = vgclip.load_checkpoint(setup.checkpoint)
    transform = eval_transform(transform, options.crops)
    engine = ScoringEngine(model, transform, tokenizer, device=setup.device, max_batch=setup.max_batch,
                           max_wait_s=setup.batch_wait_ms / 1000)  # fmt: skip
    options.info["device"] = str(engine.device)
    return create_app(engine, options, report)


def serve(app: Any, host: str, port: int) -> None:
    """Run uvicorn until Ctrl-C (uvicorn shuts down cleanly on SIGINT / SIGTERM)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
