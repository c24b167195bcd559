"""Canonical JSON: the byte form hashed by the audit chain and signed by control commands.

Sorted keys, no whitespace, UTF-8. Decimals and timestamps are already strings in the JSON
dump of a model, so two processes that agree on the values agree on the bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
