"""A tiny saved run and a `vgclip zeroshot` report on synthetic VOC data, for the `vgclip serve` tests."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_PHOTOS = SHARED / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"


def make_run(folder: Path) -> Path:
    """A randomly initialised 'tiny' run folder (fast to load; scores are arbitrary but deterministic)."""
    import vgclip
    from vgclip.model.checkpoint import save_model

    config = vgclip.load_config("tiny")
    model, _, tokenizer = vgclip.create_model(config)
    save_model(folder, model, tokenizer, config)
    return folder


def make_report(run: Path, folder: Path, score: str = "sigmoid") -> tuple[Path, Path]:
    """(report folder, VOC folder): `vgclip zeroshot` on 40 synthetic VOC images, thresholds tuned per class."""
    from vgclip.cli import main
    from vgclip.synthetic.writers import write_synthetic_voc

    voc = folder / "voc"
    write_synthetic_voc(voc, 40, seed=5, min_side=64, max_side=80)
    report = folder / "report"
    argv = ["zeroshot", "--checkpoint", str(run), "--voc-root", str(voc), "--out", str(report), "--workers", "0",
            "--no-plots", f"eval.score={score}"]  # fmt: skip
    assert main(argv) == 0
    return report, voc
