"""The request bodies in the app's OpenAPI document (/openapi.json).

The generation routes read their body themselves (``serving.parse_body``: any Content-Type,
a size limit, a nesting limit), so FastAPI cannot see their models; each route declares its
body here instead, and the models' JSON schemas join the document's components. Clients and
the API fuzzer (``benchmarks/fuzz_api.py``, ``tests/test_api_fuzz.py``) read them there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra`` declaring ``model`` as its required JSON body."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def with_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with ``models``' schemas (and the models they use) among the components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=_REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi
