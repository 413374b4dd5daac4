"""Reading `vgclip prepare`'s shards in tests with webdataset, as a user's own pipeline reads them."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds


def shard_samples(path: str | Path) -> dict[str, dict]:
    """Sample key -> {"meta": the decoded regions document, "jpg": the JPEG bytes, "members": member suffixes}.

    webdataset's own decoder inflates the `json.gz` member: what vgclip writes, a plain webdataset
    pipeline reads without vgclip.
    """
    samples = {}
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode():
        members = sorted(k for k in sample if not k.startswith("__"))
        samples[sample["__key__"]] = {"meta": sample["json.gz"], "jpg": sample["jpg"], "members": members}
    return samples
