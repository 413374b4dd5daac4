"""Deciding whether to use the network for pretrained weights, quickly.

huggingface_hub retries an unreachable host for a long time per file; on a machine without
network we would rather say at once that the weights are not available locally and how to get
them. The check goes through the hub library's own HTTP session, so whatever reaches the hub for
the download (HTTPS_PROXY / NO_PROXY, HF_ENDPOINT, offline mode) decides the check too.
"""

from __future__ import annotations

import functools
import os

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when the user asked for no network (env read at call time, not at import time)."""
    import huggingface_hub.constants as hf_constants

    # The hub reads HF_HUB_OFFLINE once at import; a flag set later (tests, notebooks) counts too.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(f.strip().upper() in _TRUE for f in flags)


@functools.lru_cache(maxsize=8)
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP request to `url` gets any answer within `timeout` seconds.

    Sent with huggingface_hub's session: proxies from the environment apply, as they do for the
    download itself (a raw TCP connect would call a host behind a proxy unreachable).
    """
    from huggingface_hub import get_session

    try:
        get_session().head(url, timeout=timeout)
    except Exception:  # noqa: BLE001 - the hub's HTTP stack (and so its error types) changes between versions
        return False
    return True


def hub_endpoint() -> str:
    """The Hugging Face endpoint in use (HF_ENDPOINT or huggingface.co)."""
    import huggingface_hub.constants as hf_constants

    return os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT


def local_files_only(url: str | None = None) -> bool:
    """Use only cached files: offline requested, or the host (default: the HF hub) is unreachable."""
    return hub_offline() or not host_reachable(url or hub_endpoint())
