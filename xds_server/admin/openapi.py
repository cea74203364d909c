"""The OpenAPI 3 description of the admin API, served at /openapi.json.

Written out by hand, not derived from the router, so it is a contract the tests
can hold the router to (every route documented, nothing documented that is not
routed) rather than a copy of it. `openapi_document` adds the read token's
security requirement when the server has one.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from xds_server import __version__
from xds_server.admin.auth import PROBE_PATHS

__all__ = ["DOCUMENT", "openapi_document"]

_ERROR: Final = {"$ref": "#/components/schemas/Error"}
_OBJECT: Final = {"type": "object"}


def _json(description: str, schema: dict[str, Any] = _OBJECT) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "malformed request: bad endpoint key in the URL or bad body",
        401: "missing or wrong bearer token (or no token configured: changes disabled)",
        403: "the read token was sent: it cannot change state",
        404: "no such pool or endpoint",
        409: "conflicts with what is served (already there, last active endpoint, weights)",
        413: "body over 64 KiB",
        503: "the state file could not be written; nothing changed",
    }
    return {str(code): _json(reasons[code], _ERROR) for code in codes}


_POOL: Final = {"name": "pool", "in": "path", "required": True, "schema": {"type": "string"}}
_ENDPOINT: Final = {
    "name": "endpoint",
    "in": "path",
    "required": True,
    "description": "ADDRESS:PORT, [IPv6]:PORT for IPv6",
    "schema": {"type": "string"},
}
_SECURED: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
_MUTATION_ERRORS: Final = (400, 401, 404, 409, 503)


def _get(summary: str, response: dict[str, Any], *params: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": response}}
    if params:
        operation["parameters"] = list(params)
        operation["responses"].update(_errors(404))
    return {"get": operation}


def _endpoint_change(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": _SECURED,
        "parameters": [_POOL, _ENDPOINT],
        "responses": {
            "200": _json("the endpoint as served now", {"$ref": "#/components/schemas/Endpoint"}),
            **_errors(*_MUTATION_ERRORS),
        },
    }


DOCUMENT: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {
        "title": "xds-server admin API",
        "version": __version__,
        "description": "State of the xDS control plane and changes to its pools. Changes are "
        "kept in an overlay over the snapshot file (persisted with --state) and need "
        '`Authorization: Bearer <token>`. Errors are JSON {"error": "..."}.',
    },
    "paths": {
        "/": {
            "get": {
                "summary": "live status page (HTML)",
                "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
            }
        },
        "/status.js": {
            "get": {
                "summary": "the status page's script",
                "responses": {
                    "200": {"description": "JavaScript", "content": {"text/javascript": {}}}
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "readiness: 200 once the first config is served, 503 before and "
                "while shutting down",
                "responses": {
                    "200": {"description": "ready", "content": {"application/json": {}}},
                    "503": {"description": "not ready", "content": {"application/json": {}}},
                },
            }
        },
        "/healthz": _get("liveness, connected clients, the last snapshot file load", _json("ok")),
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format)",
                "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": _get("this document", _json("OpenAPI 3 document")),
        "/api/v1/snapshot": _get(
            "config dump per node group and type (proto3 JSON) with versions, and the overlay",
            _json("config dump"),
        ),
        "/api/v1/nodes": _get(
            "connected clients: id, cluster, group, protocol, certificate identities (mTLS), "
            "per type the sent and ACKed version and the last NACK with its error; and the "
            "latest streams refused (a certificate claiming another group, a limit) with why",
            _json("nodes"),
        ),
        "/api/v1/pools": _get("served pools with endpoint counts per state", _json("pools")),
        "/api/v1/pools/{pool}/endpoints": {
            **_get(
                "a pool's endpoints: static and effective weight, state, load signals and age",
                _json(
                    "endpoints",
                    {
                        "type": "object",
                        "properties": {
                            "endpoints": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Endpoint"},
                            }
                        },
                    },
                ),
                _POOL,
            ),
            "post": {
                "summary": "add an endpoint to a pool",
                "security": _SECURED,
                "parameters": [_POOL],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewEndpoint"}}
                    },
                },
                "responses": {
                    "201": _json("added", {"$ref": "#/components/schemas/Endpoint"}),
                    **_errors(*_MUTATION_ERRORS, 413),
                },
            },
        },
        "/api/v1/pools/{pool}/endpoints/{endpoint}": {
            "delete": {
                **_endpoint_change("stop serving an endpoint (a file endpoint is hidden)"),
                "responses": {"200": _json("removed"), **_errors(*_MUTATION_ERRORS)},
            }
        },
        "/api/v1/pools/{pool}/endpoints/{endpoint}/drain": {
            "post": _endpoint_change("drain: Envoy sends the endpoint no new requests")
        },
        "/api/v1/pools/{pool}/endpoints/{endpoint}/undrain": {
            "post": _endpoint_change("lift a drain")
        },
        "/api/v1/overlay": _get(
            "the API's changes over the file, the state file, and entries the file makes inert",
            _json("overlay"),
        ),
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "the admin token (--admin-token-file or XDS_ADMIN_TOKEN)",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "NewEndpoint": {
                "type": "object",
                "required": ["address", "port"],
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string", "description": "IPv4 or IPv6 literal"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "zone": {"type": "string", "default": ""},
                    "weight": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 1},
                },
            },
            "Endpoint": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "address": {"type": "string"},
                    "port": {"type": "integer"},
                    "zone": {"type": "string"},
                    "origin": {"type": "string", "enum": ["file", "kubernetes", "api"]},
                    "state": {"type": "string", "enum": ["active", "draining"]},
                    "static_weight": {"type": "integer"},
                    "effective_weight": {"type": "integer"},
                    "saturated": {"type": "boolean"},
                    "load": {"type": "object", "nullable": True},
                },
            },
        },
    },
}


def openapi_document(read_auth: bool) -> dict[str, Any]:
    """The document as a server serves it: with a read token (`read_auth`), every operation
    but the probes needs the read token or the admin token; changes still the admin token."""
    if not read_auth:
        return DOCUMENT
    document = copy.deepcopy(DOCUMENT)
    document["info"]["description"] += (
        " This server also needs a token to read: the read token or the admin token; "
        "/healthz and /readyz stay open for probes."
    )
    document["components"]["securitySchemes"]["read"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the read token (--admin-read-token-file or XDS_ADMIN_READ_TOKEN); "
        "it cannot change state",
    }
    document["security"] = [{"read": []}, {"bearer": []}]  # either one
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path in PROBE_PATHS:
                operation["security"] = []  # open
            elif method == "get":
                operation["responses"].update(_errors(401))
            else:
                operation["responses"].update(_errors(403))
    return document
