"""The OpenAPI 3.1 description of every endpoint, served at /openapi.json."""

from __future__ import annotations

import copy
from typing import Any

from maxtwo_cli import __version__

_ERROR = {
    "type": "object",
    "required": ["status", "title"],
    "properties": {
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "title": {"type": "string"},
        "description": {"type": "string"},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _unavailable(description: str) -> dict[str, Any]:
    """A 503 of the database's: the error, and when to try again."""
    return {
        **_error(description),
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    }


# HEAD is answered as GET without the body (RFC 9110 section 9.3.2) everywhere but on `/`,
# where every GET records a query, which a HEAD, a safe method, must not do (405 there).
_HEAD_AS_GET = ("/counters/{key}", "/healthz", "/metrics", "/openapi.json")


def _with_head(paths: dict[str, Any]) -> dict[str, Any]:
    """`paths` with a HEAD operation beside each GET of _HEAD_AS_GET: its statuses and headers."""
    for path in _HEAD_AS_GET:
        head = copy.deepcopy(paths[path]["get"])
        head["operationId"] += "Head"
        head["summary"] = f"As GET {path}, without the body."
        # No body, and no 405: the route takes HEAD.
        head["responses"] = {status: {name: value for name, value in response.items() if name != "content"}
                             for status, response in head["responses"].items() if status != "405"}
        paths[path]["head"] = head
    return paths


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may serialise it however they like)."""
    common_errors = {
        "404": _error("No such path."),
        "405": _error("The path exists but not for this method."),
        "500": _error("An unexpected error; details go only to the server log."),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maxtwo",
            "version": __version__,
            "description": (
                "A million users whose points (0..100) are re-rolled every minute; each query "
                "returns at most two users above a hidden number and the previous query's time. "
                "Beside them, counters: an increment is acknowledged once it is committed."
            ),
        },
        "paths": _with_head({
            "/": {
                "get": {
                    "operationId": "query",
                    "summary": "At most 2 users above the hidden number, and the previous query's time.",
                    "description": (
                        "Records now as the last query time. `timestamp` is the time recorded by "
                        "the previous query (UTC), null for the first query ever."
                    ),
                    "responses": {
                        "200": {
                            "description": "The answer.",
                            "headers": {
                                "X-Maxtwo-Recorded-At": {
                                    "description": "The time this query recorded, ISO 8601 with microseconds.",
                                    "schema": {"type": "string"},
                                },
                                "X-Maxtwo-Previous-At": {
                                    "description": "`timestamp` at full precision; absent on the first query ever.",
                                    "schema": {"type": "string"},
                                },
                            },
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/QueryAnswer"},
                                    "example": {
                                        "users": [{"id": 1, "points": 30}, {"id": 72, "points": 30}],
                                        "timestamp": "2020-07-30 17:09:33Z",
                                    },
                                }
                            },
                        },
                        "503": _unavailable("The database is unavailable; retry after Retry-After seconds."),
                        **common_errors,
                    },
                }
            },
            "/increment": {
                "post": {
                    "operationId": "increment",
                    "summary": "Add `value` to the counter under `key`; answered once committed.",
                    "description": (
                        "202 only after the transaction holding this increment has committed (many "
                        "requests share one transaction). A retry with the same Idempotency-Key and "
                        "the same body within 24 hours answers 202 without applying it again."
                    ),
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": (
                                "1 to 255 printable ASCII characters, no comma (two of these headers "
                                "arrive joined by one: a 400), no space first or last (HTTP drops it); "
                                "the retry of a request uses the same."
                            ),
                            # Printable ASCII (space to ~) but the comma, a literal "-" last in each
                            # class; neither first nor last a space, which HTTP strips from a value.
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                       "pattern": "^[!-+.-~-]([ -+.-~-]*[!-+.-~-])?$"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Increment"}}},
                    },
                    "responses": {
                        "202": {"description": "Committed: the counter holds the increment (no body)."},
                        "400": _error("The body is not JSON in UTF-8, or not a JSON object; or a malformed Idempotency-Key."),
                        "409": _error("The counter's total would leave the signed 64-bit range; it keeps its value."),
                        "413": _error("The body is larger than 4096 bytes."),
                        "415": _error(
                            "The body is not application/json (or names a charset other than UTF-8), or comes "
                            "with a Content-Encoding other than identity."
                        ),
                        "422": _error(
                            "A missing, unknown or repeated field, a wrong type, a value out of range, a key of "
                            "the wrong length; or an Idempotency-Key already used for a different body."
                        ),
                        "503": _unavailable(
                            "The database is unavailable or too many increments wait; retry after Retry-After "
                            "seconds. The increment may have been applied all the same: retry with the same "
                            "Idempotency-Key."
                        ),
                        **common_errors,
                    },
                }
            },
            "/counters/{key}": {
                "get": {
                    "operationId": "counter",
                    "summary": "The committed total of one counter.",
                    "parameters": [
                        {
                            "name": "key",
                            "in": "path",
                            "required": True,
                            "description": "The counter's key, percent-encoded (a / as %2F).",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The counter.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Counter"}}},
                        },
                        "404": _error("No counter under this key: it was never incremented (or POST /increment would refuse the key)."),
                        "503": _unavailable(
                            "The database is unavailable, or too many reads wait for it; retry after Retry-After seconds."
                        ),
                        **{code: error for code, error in common_errors.items() if code != "404"},
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether the database answers and would take maxtwo's writes.",
                    "responses": {
                        "200": {
                            "description": "The database answers and would take maxtwo's writes.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        "503": {
                            **_unavailable("The database does not answer, refuses writes, fails every write of this server, "
                                          "or too many reads wait for it (the log says why)."),
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                        },
                        **common_errors,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **common_errors,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **common_errors,
                    },
                }
            },
        }),
        "components": {
            "schemas": {
                "User": {
                    "type": "object",
                    "required": ["id", "points"],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "points": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                },
                "QueryAnswer": {
                    "type": "object",
                    "required": ["users", "timestamp"],
                    "additionalProperties": False,
                    "properties": {
                        "users": {"type": "array", "maxItems": 2, "items": {"$ref": "#/components/schemas/User"}},
                        "timestamp": {
                            "type": ["string", "null"],
                            "pattern": r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z$",
                        },
                    },
                },
                "Increment": {
                    "type": "object",
                    "required": ["key", "value"],
                    "additionalProperties": False,
                    "properties": {
                        "key": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[^\x00]*$"},
                        "value": {
                            "type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1,
                            # JSON Schema calls 1.0 an integer; the API takes what JSON writes as one.
                            "description": "A JSON integer as written: 1.0, 1e3 and \"5\" are refused (422).",
                        },
                    },
                },
                "Counter": {
                    "type": "object",
                    "required": ["key", "value"],
                    "additionalProperties": False,
                    "properties": {
                        "key": {"type": "string"},
                        "value": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "unavailable"]},
                        "description": {"type": "string"},
                    },
                },
                "Error": _ERROR,
            }
        },
    }
