"""Zero-shot scoring throughput: vgclip's path beside open_clip's, same model weights, one run.

Both paths score every image of a folder against the 20 VOC classes ("a photo of a {}.") with the same
vgclip towers and the same DataLoader settings (batch size, workers, eval transform):
  vgclip:    build_text_classifier + encode_images (ImageListDataset, safe decoding) + softmax scores
  open_clip: open_clip.build_zero_shot_classifier + the scoring loop of open_clip_train.zero_shot.run
             (model(image=...) -> 100 * features @ classifier, softmax) over a plain Pillow folder dataset
             (open_clip's own data path); the vgclip model is wrapped
             in open_clip's model interface (encode_text(tokens, normalize) / forward(image=...)).
Rounds alternate between the two; the best round of each counts (the machine may be shared). Prints one
JSON line with images/s of each and vgclip/open_clip (target >= 1.0), plus the largest difference between
the two classifiers' class embeddings (they must be the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # open_clip_train's loop wraps the loader in tqdm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vgclip  # noqa: E402
from vgclip.data.voc import STANDARD_CLASSES  # noqa: E402
from vgclip.eval.prompts import SINGLE_TEMPLATE, build_text_classifier, readable_name  # noqa: E402
from vgclip.eval.scoring import encode_images, logit_scale_of, score_embeddings  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/voc2012-sample/VOCdevkit/VOC2012/JPEGImages"


class OpenClipAdapter(torch.nn.Module):
    """A vgclip ClipModel behind open_clip's CLIP interface (what build_zero_shot_classifier and run() call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_text(self, tokens: dict, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: dict | None = None) -> dict:
        return {"image_features": self.model.encode_image(image, normalize=True)}


class TokenBatch(dict):
    """vgclip tokenizer output with the `.to(device)` open_clip expects of its token tensor."""

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch({k: v.to(device) for k, v in self.items()})


class FolderDataset(torch.utils.data.Dataset):
    """open_clip-style image dataset: Pillow open + convert("RGB") + transform, dummy target 0."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            # Planar, as open_clip's torchvision preprocess returns (vgclip's transform gives
            # channels-last tensors, which default_collate would gather more slowly).
            return self.transform(img.convert("RGB")).contiguous(), 0


def vgclip_path(model, transform, tokenizer, paths, texts, args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    class_emb = build_text_classifier(model, tokenizer, texts, [SINGLE_TEMPLATE], args.device)
    enc = encode_images(model, paths, transform, args.batch_size, args.workers, args.device)
    scores, _ = score_embeddings(enc.embeddings, class_emb.cpu(), "softmax", logit_scale_of(model))
    assert scores.shape == (len(paths), len(texts)) and not enc.failed
    return len(paths) / (time.perf_counter() - start), class_emb.cpu().numpy()


def open_clip_run(model, classifier: torch.Tensor, loader, device: torch.device) -> torch.Tensor:
    """open_clip_train.zero_shot.run's scoring loop (fp32), returning the scores instead of top-k accuracy
    (its accuracy helper fails on numpy 2: float() of a 1-element array)."""
    from open_clip import get_input_dtype

    input_dtype = get_input_dtype("fp32")
    out = []
    with torch.inference_mode():
        for images, _target in loader:
            images = images.to(device=device, dtype=input_dtype)
            output = model(image=images)
            image_features = output["image_features"] if isinstance(output, dict) else output[0]
            out.append((100.0 * image_features @ classifier).softmax(dim=-1).cpu())
    return torch.cat(out)


def open_clip_path(model, transform, tokenizer, paths, texts, args) -> tuple[float, np.ndarray]:
    from open_clip import build_zero_shot_classifier

    adapter = OpenClipAdapter(model)
    start = time.perf_counter()
    classifier = build_zero_shot_classifier(adapter, lambda t: TokenBatch(tokenizer(t)), texts,
                                            [SINGLE_TEMPLATE], num_classes_per_batch=10, device=args.device)  # fmt: skip
    loader = torch.utils.data.DataLoader(FolderDataset(paths, transform), batch_size=args.batch_size,
                                         num_workers=args.workers)  # fmt: skip
    open_clip_run(adapter, classifier, loader, torch.device(args.device))
    return len(paths) / (time.perf_counter() - start), classifier.T.cpu().numpy()


def image_folder(args: argparse.Namespace, tmp: Path) -> list[Path]:
    folder = args.folder or (SAMPLE if SAMPLE.is_dir() else None)
    if folder is None:  # no shared sample: write noise JPEGs of VOC-like sizes
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / f"{i:04d}.jpg", quality=90)
        folder = tmp
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return paths[: args.images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run folder (default: a fresh model of --config)")
    parser.add_argument("--config", default="offline-small", help="preset for a fresh model (default offline-small)")
    parser.add_argument("--folder", type=Path, help="images to score (default: the shared VOC2012 sample)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.checkpoint:
        model, transform, tokenizer = vgclip.load_checkpoint(args.checkpoint)
    else:
        model, transform, tokenizer = vgclip.create_model(vgclip.load_config(args.config))
    model = model.to(args.device).eval()
    # open_clip gets its own copy, untouched by vgclip's inference settings (encode_images switches
    # the model it is given to channels_last).
    open_clip_copy = copy.deepcopy(model)
    texts = [readable_name(c) for c in STANDARD_CLASSES]
    best = {"vgclip": 0.0, "open_clip": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        paths = image_folder(args, Path(tmp))
        for _ in range(args.rounds):
            rate_v, emb_v = vgclip_path(model, transform, tokenizer, paths, texts, args)
            rate_o, emb_o = open_clip_path(open_clip_copy, transform, tokenizer, paths, texts, args)
            best["vgclip"], best["open_clip"] = max(best["vgclip"], rate_v), max(best["open_clip"], rate_o)
    print(json.dumps({
        "benchmark": "zeroshot_scoring", "device": args.device, "images": len(paths), "classes": len(texts),
        "batch_size": args.batch_size, "workers": args.workers, "model": args.checkpoint or args.config,
        "vgclip_images_per_s": round(best["vgclip"], 1), "open_clip_images_per_s": round(best["open_clip"], 1),
        "ratio_vgclip_over_open_clip": round(best["vgclip"] / best["open_clip"], 3),
        "classifier_max_abs_diff": float(np.abs(emb_v - emb_o).max()),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
