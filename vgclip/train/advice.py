"""One-line hints about a training recipe that the measurements say is unwise for the data at hand."""

from __future__ import annotations

from vgclip.config import Config

# Below this many training images a fully trained image tower is flagged. Measured
# (benchmarks/bench_quality.py, README "Zero-shot quality"): on 145 COCO images, fine-tuning both
# towers scored far below locked towers with trained projections. Where the two cross over is not
# measured; this bound is deliberately on the large side of that one point.
SMALL_DATA_IMAGES = 10_000


def small_data_hint(config: Config, n_train: int) -> str | None:
    """A hint when the whole image tower is fine-tuned on fewer than SMALL_DATA_IMAGES images, else None."""
    if config.model.image.lock or n_train >= SMALL_DATA_IMAGES:
        return None
    return (f"vgclip train: hint: fine-tuning the whole image tower on {n_train} training images; on small "
            "caption sets locking both towers and training the projections zero-shots better "
            "(model.image.lock=true model.text.lock=true data.augment=false train.lr=1e-3, as the offline-small "
            "preset; README 'Zero-shot quality')")


def warn_small_data(config: Config, n_train: int) -> None:
    """Print `small_data_hint` to stderr when there is one."""
    import sys

    hint = small_data_hint(config, n_train)
    if hint:
        print(hint, file=sys.stderr)
