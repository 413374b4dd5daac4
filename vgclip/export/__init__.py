"""Exports of a trained run to other tools' model formats (`vgclip export`).

open_clip.py       the open_clip folder layout (config + weights + tokenizer files) and an equality check
clip_benchmark.py  CLIP_benchmark's zero-shot protocol for VOC2007 as vgclip options, and a VOC2007 folder it reads
open_clip_load.py  an open_clip folder back into a vgclip model (what load_checkpoint does with an export folder)
run_facts.py       what a model card says about a run, read from the run folder (+ RUN/run_info.json)
model_card.py      README.md model cards (Hugging Face form) for run folders and export folders
"""
