"""The OpenAPI 3.1 document, built from :data:`worker.api.routes.OPERATIONS` and the
pydantic models they name (OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what
pydantic writes), so the document describes exactly what the handlers validate and
return."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.campaigns import Campaign
from worker.api.problems import CONTENT_TYPE
from worker.api.routes import OPERATIONS, Operation
from worker.api.schemas import ProblemBody

__all__ = ["COMMON_ERRORS", "EXAMPLE_CAMPAIGN", "openapi_document"]

_REF = "#/components/schemas/{model}"

#: The document's example definition (registered as is by the tests).
EXAMPLE_CAMPAIGN: dict[str, Any] = {
    "id": "example",
    "entry": "hello",
    "nodes": {
        "hello": {"type": "action", "action": "log", "next": "wait"},
        "wait": {"type": "wait", "event": "replied", "timeout": "P3D",
                 "on_event": "done", "on_timeout": "done"},
        "done": {"type": "exit"},
    },
}  # fmt: skip

#: Errors any ``/v1`` operation can answer.
COMMON_ERRORS = {
    400: "The body is not valid JSON",
    401: "No token, or not one of CAMPAIGN_API_TOKENS",
    500: "A stored record cannot be read (the detail names it)",
    503: "Redis is unreachable or refusing commands; retry later",
}
_ERROR_TEXT = {
    403: "The token is read-only",
    404: "No such campaign or enrollment",
    409: "Already enrolled, or the enrollment's state does not allow it",
    413: "The body or the batch is too large",
    422: "A field is invalid (the detail and errors name it)",
}


def _link(operation_id: str, parameter: str, pointer: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {parameter: f"$response.body#/{pointer}"}}


#: What a response leads to (OpenAPI links): a client, or a stateful test, follows them.
_LINKS: dict[str, dict[str, Any]] = {
    "registerCampaign": {
        name: _link(name, "campaign_id", "id")
        for name in ("getCampaign", "enroll", "enrollBatch", "listEnrollments")
    },
    "enroll": {
        name: _link(name, "enrollment_id", "enrollment_id")
        for name in ("getEnrollment", "signal", "cancel", "replay")
    },
}


def _models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = [ProblemBody]
    for op in OPERATIONS:
        for model in (op.response, op.body):
            if model is not None and model not in seen:
                seen.append(model)
    return seen


def _parameters(op: Operation, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=_REF)
        for defn_name, defn in schema.pop("$defs", {}).items():
            schemas.setdefault(defn_name, defn)
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            description = prop.pop("description", None)
            param = {"name": name, "in": "query", "required": name in schema.get("required", []),
                     "schema": prop}  # fmt: skip
            if description:
                param["description"] = description
            params.append(param)
    return params


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {CONTENT_TYPE: {"schema": {"$ref": _REF.format(model="ProblemBody")}}},
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The whole document; ``version`` is the package's."""
    _, top = models_json_schema(
        [(m, "validation" if _is_request(m) else "serialization") for m in _models()],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    definition = Campaign.model_json_schema(ref_template=_REF)
    schemas.update(definition.pop("$defs", {}))
    schemas["Campaign"] = {**definition, "examples": [EXAMPLE_CAMPAIGN]}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {
            str(op.status): {
                "description": op.summary,
                "content": {
                    "application/json": {
                        "schema": {"$ref": _REF.format(model=op.response.__name__)}
                    }
                },
            }
        }
        codes = set(COMMON_ERRORS) | set(op.errors) | ({403} if op.writes else set())
        if op.query is not None or op.body is not None or op.raw_body:
            codes.add(422)
        if op.body is not None or op.raw_body:
            codes.add(413)  # each operation reads its body up to its own limit
        for code in sorted(codes):
            responses[str(code)] = _problem(COMMON_ERRORS.get(code) or _ERROR_TEXT[code])
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": _parameters(op, schemas),
            "responses": responses,
        }
        if op.raw_body:
            entry["requestBody"] = {
                "required": True,
                "description": "A campaign definition (see the campaigns page of the docs); "
                "beyond this schema, the references between nodes are checked (422 names them)",
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model="Campaign")}}
                },
            }
        elif op.body is not None:
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=op.body.__name__)}}
                },
            }
        links = _LINKS.get(op.operation_id)
        if links:
            responses[str(op.status)]["links"] = links
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Campaign scheduler control API",
            "version": version,
            "description": "Register campaigns, enroll contacts, deliver events, cancel, "
            "inspect and replay, with the same semantics as the Python client. Every error "
            "is an RFC 9457 problem (application/problem+json).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of CAMPAIGN_API_TOKENS; a ro: token may only read",
                }
            },
        },
    }


def _is_request(model: type[BaseModel]) -> bool:
    return any(op.body is model for op in OPERATIONS)
