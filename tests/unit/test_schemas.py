"""The committed JSON Schemas are what the models generate: a model change without
`make schemas` fails here, so the published contract never drifts silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch_worker.schemas import all_schemas, asyncapi_document, render

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize("name", sorted(all_schemas()))
def test_committed_schema_matches_model(name: str) -> None:
    path = SCHEMAS / f"{name}.schema.json"
    assert path.exists(), f"{path} missing: run `make schemas`"
    assert path.read_bytes() == render(all_schemas()[name]), f"{path} drifted: run `make schemas`"


def test_committed_asyncapi_document_matches_the_worker() -> None:
    path = SCHEMAS / "asyncapi.json"
    assert path.read_bytes() == render(asyncapi_document()), f"{path} drifted: run `make schemas`"


def test_no_stale_schema_files() -> None:
    names = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    assert names == set(all_schemas())
