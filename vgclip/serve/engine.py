"""The model side of `vgclip serve`: image decoding, micro-batched image encoding, cached text classifiers.

Scores are computed exactly as `vgclip predict` computes them (`build_text_classifier`, `score_embeddings`),
so a label set chosen in the browser predicts what the command line predicts on the same files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vgclip.data.decoding import decode_image
from vgclip.data.images import ALLOWED_FORMATS, BadImageError, pil_detail
from vgclip.data.views import encode_views, unit_image_encoder
from vgclip.eval.prompts import build_text_classifier, templates_for
from vgclip.eval.scoring import logit_scale_of, score_embeddings

__all__ = ["ImageTooLargeError", "MicroBatcher", "ScoringEngine", "ServableTransform", "check_upload",
           "decode_upload", "predicted_set"]


class ServableTransform(Protocol):
    """What the server needs of a run's eval image transform (`vgclip.data.transforms.ImageTransform`)."""

    image_size: int  # side of the square model input
    draft_size: int | None  # the transform needs at least this shorter side (None: decode at full size)

    def __call__(self, image: Any) -> torch.Tensor: ...


class ImageTooLargeError(BadImageError):
    """An upload whose header claims more pixels than the server accepts (answered with 413)."""


def check_upload(name: str, data: bytes, max_pixels: int) -> None:
    """Refuse an upload from its header alone: an allowed image format within `max_pixels` (no pixels decoded)."""
    if not data:
        raise BadImageError(name, "empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is stricter
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, "too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # UnidentifiedImageError is an OSError
        raise BadImageError(name, "not_an_image", pil_detail(exc)) from None
    if width * height > max_pixels:
        raise ImageTooLargeError(name, "too_many_pixels", f"{width}x{height} > {max_pixels} pixels")


def decode_upload(name: str, data: bytes, transform: ServableTransform, max_pixels: int) -> torch.Tensor:
    """Upload bytes -> transformed image tensor, decoded as `vgclip predict` decodes files."""
    check_upload(name, data, max_pixels)
    pixels = decode_image(name, data, draft_size=transform.draft_size, tensor_ok=False)
    return transform(pixels)


@dataclass
class _Pending:
    images: torch.Tensor
    future: asyncio.Future


class MicroBatcher:
    """Encode images from concurrent requests together: the first waiting request opens a batch, which
    takes every request that arrives within `max_wait_s` (up to `max_batch` images), then runs the model
    once on a single worker thread (one forward at a time keeps torch's intra-op threads for that forward).
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], pool: concurrent.futures.Executor,
                 max_batch: int = 32, max_wait_s: float = 0.005) -> None:  # fmt: skip
        self.encode = encode
        self.pool = pool
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0  # forwards run, for /api/health
        self.images = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None

    async def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings [k, D] of `images` [k, 3, S, S], computed in a shared batch."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        pending = _Pending(images, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def close(self) -> None:
        """Stop the batching task (at server shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        count = len(batch[0].images)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while count < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            try:
                item = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            batch.append(item)
            count += len(item.images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                stacked = torch.cat([p.images for p in batch])
                emb = await loop.run_in_executor(self.pool, self.encode, stacked)
            except Exception as exc:  # every waiting request gets the error; the batcher keeps serving
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(stacked)
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(emb[start : start + len(p.images)])
                start += len(p.images)


class ScoringEngine:
    """One loaded run: encodes images (micro-batched) and label sets (cached), scores them like `vgclip predict`."""

    def __init__(self, model: torch.nn.Module, transform: ServableTransform, tokenizer: Callable, *,
                 device: str | None = None, max_batch: int = 32, max_wait_s: float = 0.005,
                 text_cache_size: int = 64) -> None:  # fmt: skip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.transform = transform
        self.tokenizer = tokenizer
        # One model thread: forwards never overlap, so torch's own threads are not oversubscribed.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgclip-model")
        self.batcher = MicroBatcher(self._encode, self.pool, max_batch, max_wait_s)
        sample = torch.zeros(1, 3, transform.image_size, transform.image_size, device=self.device)
        tokens = {k: v.to(self.device) for k, v in tokenizer(["a photo."]).items()}
        self.logit_scale = logit_scale_of(self.model, sample, tokens)
        self.logit_bias = float(getattr(model, "logit_bias", 0.0) or 0.0)
        self._texts: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self.text_cache_size = text_cache_size
        self.text_builds = 0  # label sets encoded (a cached label set is not encoded again)

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of [k, 3, S, S] images, or of [k, V, 3, S, S] multi-crop views (averaged per image)."""
        emb = encode_views(unit_image_encoder(self.model), images.to(self.device))
        return emb.float().cpu()

    @torch.inference_mode()
    def _classifier(self, texts: tuple[str, ...], templates: str) -> torch.Tensor:
        return build_text_classifier(self.model, self.tokenizer, list(texts), templates_for(templates),
                                     self.device).cpu()  # fmt: skip

    async def class_embeddings(self, texts: Sequence[str], templates: str) -> torch.Tensor:
        """Unit-norm class embeddings for a label set, computed once per (texts, templates) and cached."""
        key = (tuple(texts), templates)
        future = self._texts.get(key)
        if future is None or (future.done() and future.exception() is not None):
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(loop.run_in_executor(self.pool, self._classifier, key[0], templates))
            self.text_builds += 1
            self._texts[key] = future
            while len(self._texts) > self.text_cache_size:
                self._texts.popitem(last=False)
        self._texts.move_to_end(key)
        return await asyncio.shield(future)

    async def score(self, images: torch.Tensor, texts: Sequence[str], score: str, templates: str) -> np.ndarray:
        """Scores [k, C] of transformed images against label texts (softmax / sigmoid / cosine)."""
        class_emb, emb = await asyncio.gather(self.class_embeddings(texts, templates),
                                              self.batcher.encode_images(images))  # fmt: skip
        scores, _ = score_embeddings(emb, class_emb, score, self.logit_scale, self.logit_bias)
        return scores

    async def close(self) -> None:
        """Stop batching and the model thread."""
        await self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def predicted_set(labels: Sequence[str], scores: Sequence[float], thresholds: Sequence[float] | None) -> list[str]:
    """The labels `vgclip predict` would print: score >= threshold, or the top label when there are no thresholds."""
    if thresholds is None:
        return [labels[int(np.argmax(scores))]]
    return [lab for lab, s, t in zip(labels, scores, thresholds) if s >= t]
