"""Deciding whether to use the network for pretrained weights, quickly.

huggingface_hub retries an unreachable host for ~25 s per file; on a machine without network we
would rather say at once that the weights are not available locally and how to get them.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when the user asked for no network (env read at call time, not at import time)."""
    import huggingface_hub.constants as hf_constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(f.strip().upper() in _TRUE for f in flags)


@functools.lru_cache(maxsize=8)
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_endpoint() -> str:
    """The Hugging Face endpoint in use (HF_ENDPOINT or huggingface.co)."""
    import huggingface_hub.constants as hf_constants

    return os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT


def local_files_only(url: str | None = None) -> bool:
    """Use only cached files: offline requested, or the host (default: the HF hub) is unreachable."""
    return hub_offline() or not host_reachable(url or hub_endpoint())
