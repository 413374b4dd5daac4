"""Exports of a trained run to other tools' model formats (`vgclip export`).

open_clip.py       the open_clip folder layout (config + weights + tokenizer files) and an equality check
                   (reading such a folder back: model/open_clip_folder.py, which vgclip.load_checkpoint uses)
clip_benchmark.py  CLIP_benchmark's zero-shot protocol for VOC2007 as vgclip options, and a VOC2007 folder it reads
run_facts.py       what a model card says about a run, read from the run folder (+ RUN/run_info.json)
model_card.py      README.md model cards (Hugging Face form) for run folders and export folders
"""
