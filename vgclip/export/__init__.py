"""Exports of a trained run to other tools' model formats (`vgclip export`).

open_clip.py       the open_clip folder layout (config + weights + tokenizer files) and an equality check
clip_benchmark.py  CLIP_benchmark's zero-shot protocol for VOC2007 as vgclip options, and a VOC2007 folder it reads
"""
