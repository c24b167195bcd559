"""Loading the TOML configuration, with `ORCH_*` environment overrides, and explaining errors.

Environment overrides address one scalar each: `ORCH_<SECTION>_<KEY>` for the sections kafka,
worker, venue and sink (e.g. `ORCH_KAFKA_BOOTSTRAP`, `ORCH_WORKER_HTTP_PORT`), plus the short
forms the contract names: `ORCH_HTTP_PORT` (the running process's port) and `ORCH_DB`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orch_worker.domain.config import OrchConfig

ENV_SECTIONS = ("kafka", "worker", "venue", "sink")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every wrong key."""


def explain(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(file)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(f"{where}: {err['msg']}")
    return lines


def _env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section in ENV_SECTIONS:
        fields = type(OrchConfig().__getattribute__(section)).model_fields
        for key in fields:
            value = env.get(f"ORCH_{section.upper()}_{key.upper()}")
            if value is not None:
                merged.setdefault(section, {})[key] = value
    return merged


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    bootstrap: str | None = None,
) -> OrchConfig:
    """The effective configuration: file, then `ORCH_*` variables, then explicit flags."""
    env = os.environ if env is None else env
    path = path or env.get("ORCH_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    raw = _env_overrides(raw, env)
    if env.get("ORCH_CONTROL_SECRET") and "control_secret" not in raw.get("worker", {}):
        raw.setdefault("worker", {})["control_secret"] = env["ORCH_CONTROL_SECRET"]
    if bootstrap:
        raw.setdefault("kafka", {})["bootstrap"] = bootstrap
    try:
        return OrchConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}" if path else "configuration"
        raise ConfigError(f"{where}:\n  " + "\n  ".join(explain(exc))) from exc
