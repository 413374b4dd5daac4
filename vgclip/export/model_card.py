"""Model cards: README.md in Hugging Face model-card form for a run folder and for an open_clip export.

The YAML front matter (library_name, tags, datasets, metrics, and a model-index with the zero-shot mAP
when the run was evaluated) is built with huggingface_hub's ModelCardData, so the Hub reads it as its
own; the body is generated from the run (run_facts.py): preset and resolved config, the shards'
manifest (what the data was: tags and words per source kind), training time and hardware, validation
recall@K, the zero-shot mAP tracked while training and the checkpoint train.select_by chose, zero-shot
mAP against chance, and how to install vgclip and load the model. A run card names paths relative to
the run folder (the folder itself by its name). Cards are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vgclip.export.run_facts import RunFacts, gather_run_facts, record_training, remember_report, shown_path
from vgclip.io import atomic_write_text
from vgclip.model.checkpoint import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE
from vgclip.summary import TrainSummary

__all__ = ["card_data", "final_model_run", "finish_run_card", "refresh_after_zeroshot", "write_export_card",
           "write_run_card"]

CARD_FILE = "README.md"
# Hub dataset ids of the caption sources `vgclip prepare` reads (manifest inputs.source).
HUB_DATASETS = {"vg": "ranjaykrishna/visual_genome", "coco": "detection-datasets/coco"}
TAGS = ["clip", "vgclip", "zero-shot-image-classification"]
# Tags and a description per kind of training data (run_facts.data_summary's `kind`).
DATA_TAGS = {"vg": ["visual-genome", "region-descriptions"], "coco": ["coco", "image-captions"],
             "csv": ["image-captions"], "img2dataset": ["img2dataset", "image-captions"]}
DATA_WORDS = {"vg": "Visual Genome region descriptions (phrases with boxes)",
              "coco": "COCO captions (whole-image captions)",
              "csv": "whole-image captions from a CSV file{file}",
              "img2dataset": "image-caption tar shards in img2dataset / open_clip layout (a caption per image)"}
# vgclip is not on a package registry: the card says how to install what exists.
INSTALL = ("vgclip is installed from a clone of its repository: `pip install -e .` in the clone "
           "(`pip install -e \".[export]\"` adds open_clip)")


def card_data(facts: RunFacts | None, name: str, library: str) -> ModelCardData:
    """The front matter: library, tags, datasets, metrics, and the zero-shot result as a model-index."""
    source = (facts.data or {}).get("source") if facts else None
    kind = (facts.data or {}).get("kind") if facts else None
    tracked = bool(facts and facts.selection and facts.selection["history"])
    metrics = (["recall"] if facts and facts.val else []) + (["mAP"] if facts and (facts.zeroshot or tracked) else [])
    results = []
    if facts and facts.zeroshot:
        z = facts.zeroshot
        dataset = f"Pascal VOC layout, split {z['split']} ({Path(str(z['voc_root'])).name})"
        for metric, value, label in (("mAP", z["mAP"], "zero-shot mAP"), ("mAP", z["chance"], "chance mAP")):
            if isinstance(value, (int, float)):
                results.append(EvalResult(task_type="zero-shot-image-classification", dataset_type="voc",
                                          dataset_name=dataset, dataset_split=str(z["split"]),
                                          metric_type=metric, metric_name=label,
                                          metric_value=round(float(value), 4)))  # fmt: skip
    return ModelCardData(
        library_name=library, tags=TAGS + DATA_TAGS.get(kind, []) + (["open_clip"] if library == "open_clip" else []),
        datasets=[HUB_DATASETS[source]] if source in HUB_DATASETS else None, metrics=metrics or None,
        pipeline_tag="zero-shot-image-classification", model_name=name, eval_results=results or None,
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _model_lines(config: dict[str, Any]) -> list[str]:
    model = config.get("model") or {}
    image, text = model.get("image") or {}, model.get("text") or {}
    return [
        "## Model", "",
        f"- image tower: timm `{image.get('name')}` at {image.get('image_size')} px, mean {image.get('mean')}, "
        f"std {image.get('std')}",
        f"- text tower: transformers `{text.get('name')}`, {text.get('pooling')} pooling, "
        f"up to {text.get('max_length')} tokens",
        f"- shared embedding: {model.get('embed_dim')} dimensions, bias-free linear projections", "",
    ]


def _training_lines(facts: RunFacts) -> list[str]:
    lines = ["## Training", ""]
    if facts.preset:
        lines.append(f"- preset: `{facts.preset}`, with {len(facts.preset_diffs)} setting(s) differing "
                     "(overrides, or values resolved for the hardware and the weights; full config below)")
        lines += [f"  - `{d}`" for d in facts.preset_diffs[:25]]
    t = facts.training
    if t is None:
        return lines + ["- training time and hardware: not recorded for this run", ""]
    lines += [
        f"- training time: {_duration(float(t['train_seconds']))} over {t.get('sessions', 1)} session(s); "
        f"{t.get('steps')} optimizer steps, {t.get('epochs')} epoch(s), {t.get('samples_seen')} image-text pairs seen",
        f"- hardware: {t.get('hardware')} x {t.get('processes', 1)} process(es)",
        f"- final training loss {_num(t.get('final_train_loss'))}, best validation loss {_num(t.get('best_val_loss'))}",
        "- software: " + ", ".join(f"{k} {v}" for k, v in (t.get("versions") or {}).items()), "",
    ]
    return lines


def describe_data(data: dict[str, Any] | None) -> str:
    """What the run trained on, in words: the source kind of its shards (run_facts.data_summary)."""
    kind = (data or {}).get("kind")
    if kind not in DATA_WORDS:
        return "image-text shards (their source is not recorded)" if data else "data this card has no record of"
    named = (data or {}).get("input_file")
    return DATA_WORDS[kind].format(file=f" `{named}`" if named else "")


def _pairing(config: dict[str, Any]) -> str:
    spec = str((config.get("data") or {}).get("pairing") or "single")
    if spec.startswith("combine:"):
        return f"`{spec}`: each epoch, up to {spec.partition(':')[2]} of an image's texts joined into one, whole image"
    if spec == "region":
        return "`region`: each epoch, one region per image, the image cropped to its box (whole image if none)"
    return f"`{spec}`: each epoch, one of an image's texts with the whole image"


def _data_lines(facts: RunFacts, base: Path) -> list[str]:
    d = facts.data
    if d is None:
        return []
    lines = ["## Training data", "", f"- {describe_data(d)}", f"- shards: `{shown_path(d['location'], base)}`",
             f"- pairing {_pairing(facts.config)}"]
    if d.get("manifest") is None:
        why = "tar shards not written by `vgclip prepare`" if d.get("kind") else "shards not in a local folder"
        return lines + [f"- manifest.json: none read ({why})", ""]
    lines.append(f"- source: {d.get('source') or 'unknown'}, format {d.get('format')}, "
                 f"{d.get('skipped')} item(s) skipped while preparing (reasons in `{shown_path(d['manifest'], base)}`)")
    texts = "phrases" if d.get("kind") in ("vg", None) else "captions"
    lines += [f"- {split}: {c.get('images')} images, {c.get('regions')} {texts}, {c.get('shards')} shards"
              for split, c in d.get("splits", {}).items()]  # fmt: skip
    return lines + [""]


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _result_lines(facts: RunFacts, base: Path) -> list[str]:
    lines = ["## Results", ""]
    v = facts.val
    if v:
        lines.append(f"Validation (held-out shards, epoch {v.get('epoch')}, step {v.get('step')}): loss "
                     f"{_num(v.get('loss'))}; image->text recall@1/5/10 {_num(v.get('i2t_r1'))} / "
                     f"{_num(v.get('i2t_r5'))} / {_num(v.get('i2t_r10'))}; text->image "
                     f"{_num(v.get('t2i_r1'))} / {_num(v.get('t2i_r5'))} / {_num(v.get('t2i_r10'))}.")
    else:
        lines.append("Validation: no validation rows in metrics.csv.")
    lines += _selection_lines(facts)
    z = facts.zeroshot
    if z:
        lines += ["", f"Zero-shot multi-label classification on `{Path(str(z['voc_root'])).name}` (split {z['split']}, "
                  f"{z['images']} images, {z['classes']} classes): **mAP {_num(z['mAP'])}** against a chance "
                  f"level of {_num(z['chance'])} (mean class prevalence); VOC07 11-point mAP "
                  f"{_num(z['mAP_voc07_11pt'])}. Scores: {z['score']}; templates: {z['templates']}; "
                  f"difficult objects: {z['difficult']}. Full report: `{shown_path(z['report'], base)}`."]
    elif facts.selection and facts.selection["history"]:
        lines += ["", "Zero-shot report of the final model (test split, tuned thresholds): not made yet "
                  "(`vgclip zeroshot --checkpoint RUN --voc-root VOC --out DIR` refreshes this card)."]
    else:
        lines += ["", "Zero-shot: not evaluated yet (`vgclip zeroshot --checkpoint RUN --voc-root VOC --out DIR` "
                  "refreshes this card)."]
    return lines + [""]


def _selection_lines(facts: RunFacts) -> list[str]:
    """The zero-shot mAP tracked every epoch (--val-voc-root) and the checkpoint train.select_by chose."""
    sel, lines = facts.selection, []
    if sel is None:
        return lines
    history = sel["history"]
    if history:
        voc = f"`{Path(sel['val_voc_root']).name}`" if sel.get("val_voc_root") else "folder"
        shown = ", ".join(f"epoch {e} {value:.4f}" for e, value in history[-10:])
        more = f" (last 10 of {len(history)} epochs)" if len(history) > 10 else ""
        top_epoch, top = max(history, key=lambda item: item[1])
        lines += ["", f"Zero-shot mAP tracked while training on the held-out VOC-layout {voc} (`--val-voc-root`, "
                  f"scored after every epoch without threshold tuning; `metrics.csv` column `zeroshot_map`): "
                  f"{shown}{more}; highest **{top:.4f}** (epoch {top_epoch})."]
    best = sel["best"]
    if best:
        by_map = best.get("select_by") == "zeroshot_map"
        rule, metric = ("highest zero-shot mAP", "mAP") if by_map else ("lowest validation loss", "validation loss")
        lines += ["", f"Best checkpoint (`train.select_by={best.get('select_by')}`, the {rule}): "
                  f"`checkpoints/{Path(str(best.get('checkpoint'))).name}` (after epoch {best.get('epoch')}, step "
                  f"{best.get('step')}), {metric} **{_num(best.get('value'))}**. Its weights are `best.safetensors` "
                  f'(`vgclip.load_checkpoint("{facts.run_dir.name}/best.safetensors")`); `model.safetensors`, '
                  "which the rest of this card describes, holds the last epoch's."]
    return lines


def _config_lines(config: dict[str, Any]) -> list[str]:
    dumped = yaml.safe_dump(config, sort_keys=False).rstrip()
    return ["<details><summary>Resolved config (config.yaml)</summary>", "", "```yaml", dumped, "```", "",
            "</details>", ""]  # fmt: skip


def _write(folder: Path, data: ModelCardData, title: str, body: list[str]) -> Path:
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n" + "\n".join(body))
    path = folder / CARD_FILE
    atomic_write_text(path, str(card))
    return path


def write_run_card(run_dir: str | Path, report_dir: Path | None = None) -> Path:
    """RUN/README.md from the run folder (and the zero-shot report `report_dir`, if given).

    Paths are written relative to the run folder, and the run folder by its name: the card must still
    read true once the folder is uploaded or copied elsewhere.
    """
    facts = gather_run_facts(run_dir, report_dir)
    name = facts.run_dir.name
    usage = [
        "## Use", "", f"{INSTALL}. From the folder that holds this one (`{name}`):", "", "```python",
        "import vgclip", "", f'model, image_transform, tokenizer = vgclip.load_checkpoint("{name}")', "```", "",
        "```bash", f"vgclip predict --checkpoint {name} --labels 'dog,car,person' photo.jpg", "```", "",
        "With open_clip, after exporting:", "", "```bash", f"vgclip export --checkpoint {name} --out {name}-open_clip",
        "```", "", "```python", "import open_clip", "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{name}-open_clip")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{name}-open_clip")', "```", "",
    ]  # fmt: skip
    body = [f"A CLIP-style dual encoder trained with vgclip on {describe_data(facts.data)}.", ""]
    body += _model_lines(facts.config) + _data_lines(facts, facts.run_dir) + _training_lines(facts)
    body += _result_lines(facts, facts.run_dir) + usage + _config_lines(facts.config)
    return _write(facts.run_dir, card_data(facts, name, "vgclip"), name, body)


def write_export_card(folder: Path, out_dir: Path, run_dir: Path | None, hub_id: str | None = None) -> Path:
    """README.md of an open_clip export folder (written into `folder`, which will become `out_dir`)."""
    facts = gather_run_facts(run_dir) if run_dir is not None else None
    name = hub_id.split("/")[-1] if hub_id else out_dir.name
    ref = f"hf-hub:{hub_id}" if hub_id else f"local-dir:{out_dir}"
    origin = f" from the run `{facts.run_dir}`." if facts else "."
    body = [
        f"An open_clip model exported by `vgclip export`{origin}", "", "## Use", "",
        "With open_clip (`pip install open_clip_torch`):", "", "```python", "import open_clip", "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{ref}")',
        f'tokenizer = open_clip.get_tokenizer("{ref}")', "```", "",
        f"With vgclip (this folder, no network; {INSTALL}):", "",
        "```python", "import vgclip", "", f'model, image_transform, tokenizer = vgclip.load_checkpoint("{out_dir}")',
        "```", "", "```bash", f"vgclip zeroshot --checkpoint {out_dir} --voc-root VOC --out report", "```", "",
    ]  # fmt: skip
    if facts is not None:
        base = out_dir.resolve()
        body += _model_lines(facts.config) + _data_lines(facts, base) + _training_lines(facts)
        body += _result_lines(facts, base) + _config_lines(facts.config)
    return _write(folder, card_data(facts, name, "open_clip"), name, body)


def finish_run_card(run_dir: str | Path, summary: TrainSummary, *, world_size: int, device: str) -> Path:
    """At the end of training: record time, hardware and data in RUN/run_info.json, then write RUN/README.md."""
    record_training(Path(run_dir), summary, world_size=world_size, device=device)
    return write_run_card(run_dir)


def final_model_run(checkpoint: str | Path) -> Path | None:
    """The run folder when `checkpoint` is a run's final model (the folder or its model.safetensors), else
    None: a step checkpoint or an export folder is not the model the run's card describes."""
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    if (path.is_file() and path.name != RUN_WEIGHTS_FILE) or not (run_dir / RUN_CONFIG_FILE).is_file():
        return None
    return run_dir


def refresh_after_zeroshot(checkpoint: str | Path, report_dir: Path) -> Path | None:
    """After `vgclip zeroshot` on a run's final model: remember the report and rewrite the run's card."""
    run_dir = final_model_run(checkpoint)
    if run_dir is None:
        return None
    remember_report(run_dir, report_dir)
    return write_run_card(run_dir, report_dir)
