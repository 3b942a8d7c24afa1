"""Layout constants and the provenance fingerprint of a feature cache.

One HDF5 file per shard::

    /features/<set>    (N, D) float16 by default; sets e.g. ``cls``, ``patch_mean``
    /labels            (N,) int64, -1 = unlabelled
    /paths             (N,) UTF-8, relative to the source's root
    /sha256            (N,) 64-char hex digest of the image file's bytes
    /source            (N,) UTF-8 name of the input source the row came from
    /group             (N,) UTF-8 group key used for leakage-free splits
    /index             (N,) int64 position of the row's image in the input list
    /failures/{index,path,reason}   images that could not be decoded

File attributes: ``format``, ``format_version``, ``complete``, ``fingerprint``,
``provenance`` (JSON), ``classes`` (JSON), and the shard's place in its extraction
plan (``plan_id``, ``input_start``, ``input_stop``, ``num_inputs``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT_NAME = "stage1-feature-cache"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"

# Provenance keys that decide what the features are. Library versions and the host
# are recorded too, but they do not enter the fingerprint: a laptop and a GPU box
# with different torch builds must still be able to share caches of the same model
# and preprocessing (the decoder, which can change pixels, is part of the recipe).
FINGERPRINT_KEYS = ("format_version", "backbone", "preprocessing", "feature_dtype", "feature_sets")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same bytes on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_of(provenance: dict[str, Any]) -> str:
    """sha256 hex digest over the feature-defining part of ``provenance``."""
    missing = [k for k in FINGERPRINT_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"provenance lacks {missing}")
    core = {k: provenance[k] for k in FINGERPRINT_KEYS}
    return hashlib.sha256(canonical_json(core).encode()).hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint[:12]
