"""JSON Schemas of the public events, generated from the models (never edited by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from orch_worker.domain.models import EVENT_MODELS


def all_schemas() -> dict[str, dict[str, Any]]:
    return {
        name: model.model_json_schema(mode="serialization") for name, model in EVENT_MODELS.items()
    }


def render(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def asyncapi_document() -> dict[str, Any]:
    """The worker's AsyncAPI document for the default configuration (topics prefixed `orch.`)."""
    from faststream.specification import AsyncAPI

    from orch_worker import __version__
    from orch_worker.adapters.kafka.worker_app import Worker
    from orch_worker.domain.config import OrchConfig

    worker = Worker(OrchConfig(), http=False)
    spec = AsyncAPI(worker.broker, title="orch-worker", version=__version__)
    doc: dict[str, Any] = orjson.loads(spec.to_specification().to_json())
    return doc


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = out / f"{name}.schema.json"
        path.write_bytes(render(schema))
        written.append(path)
    path = out / "asyncapi.json"
    path.write_bytes(render(asyncapi_document()))
    written.append(path)
    return written
