"""Small shard folders (docs/design.md format) and toy dual encoders for the training tests."""

from __future__ import annotations

import functools
import http.server
import io
import json
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "bar", "stripe")


def _image(colour: tuple[int, int, int], shape: str, size: int, rng: random.Random) -> bytes:
    img = Image.new("RGB", (size, size), (rng.randint(0, 60),) * 3)
    x, y = rng.randint(0, size // 3), rng.randint(0, size // 3)
    box = {"square": (x, y, x + size // 2, y + size // 2), "bar": (x, 0, x + size // 5, size - 1),
           "stripe": (0, y, size - 1, y + size // 5)}[shape]
    img.paste(colour, box)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, n_train: int = 48, n_val: int = 16, size: int = 48, per_shard: int = 20,
                 seed: int = 0) -> Path:
    """SHARDS/{train,val}/shard-NNNNNN.tar + manifest.json with coloured-shape images and phrases."""
    import webdataset as wds

    rng = random.Random(seed)
    splits = {}
    image_id = 0
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        names, regions = [], 0
        for start in range(0, count, per_shard):
            name = f"shard-{start // per_shard:06d}.tar"
            names.append(f"{split}/{name}")
            with wds.TarWriter(str(root / split / name)) as sink:
                for _ in range(min(per_shard, count - start)):
                    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                    phrases = [f"a {colour} {shape}", f"{colour} {shape} on dark ground", f"the {shape} is {colour}"]
                    meta = {"image_id": image_id, "source": "vg", "width": size, "height": size,
                            "regions": [{"phrase": p, "box": [0, 0, size, size]} for p in phrases]}
                    sink.write({"__key__": f"vg-{image_id:09d}", "jpg": _image(COLOURS[colour], shape, size, rng),
                                "json": json.dumps(meta).encode()})
                    image_id += 1
                    regions += len(phrases)
        splits[split] = {"images": count, "regions": regions, "shards": names}
    manifest = {"format": "webdataset", "inputs": {"fixture": True}, "settings": {"max_side": size},
                "splits": splits, "skipped": {}, "notes": {}}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


class ToyClip(nn.Module):
    """A dual encoder without batch norm: conv image tower, embedding-bag text tower, optional dropout."""

    def __init__(self, dim: int = 8, dropout: float = 0.0, vocab: int = 50):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.LayerNorm(6), nn.Dropout(dropout))
        self.text = nn.Embedding(vocab, 12)
        self.text_drop = nn.Dropout(dropout)
        self.image_proj = nn.Linear(6, dim, bias=False)
        self.text_proj = nn.Linear(12, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        text = (self.text(tokens["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"image_embeds": F.normalize(self.image_proj(self.visual(images)), dim=-1),
                "text_embeds": F.normalize(self.text_proj(self.text_drop(text)), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def toy_batches(n_batches: int, batch: int, seed: int = 0, size: int = 8, length: int = 5, vocab: int = 50):
    """In-memory (images, tokens) micro-batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        images = torch.randn(batch, 3, size, size, generator=g)
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        mask = (torch.rand(batch, length, generator=g) > 0.2).long()
        mask[:, 0] = 1
        out.append((images, {"input_ids": ids, "attention_mask": mask}))
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_folder(root: Path, cut: str | None = None, cut_at: int | None = None) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (a free port) for the block. A file whose path ends with `cut` is
    announced with its full Content-Length, but only its first `cut_at` bytes (default: half) are
    sent, then the connection closes: a stream that breaks mid-shard."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if cut is not None and self.path.endswith(cut):
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2 if cut_at is None else cut_at])
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
