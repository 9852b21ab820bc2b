"""The gateway's HTTP API as an OpenAPI 3.0 document, served at ``GET /openapi.json``.

It describes what the gateway itself accepts and answers — the Ollama- and
OpenAI-compatible routes (with Usher's additions: the ``X-Usher-*`` headers, error
``code`` / ``field``), the queue routes for people waiting over HTTP, and the operator
routes — precisely enough for generated clients, API explorers, and the schemathesis run
of ``make test`` that drives every route from it. Pure data: no I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXAMPLES", "INT32_MAX", "INT64_MAX", "openapi_document"]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _string(description: str = "", **extra: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def _int(minimum: int, maximum: int, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


def _number(minimum: float, maximum: float, description: str = "") -> Schema:
    schema: Schema = {"type": "number", "minimum": minimum, "maximum": maximum}
    if description:
        schema["description"] = description
    return schema


_MODEL = _string(
    "A model the fleet serves, e.g. 'llama3.2:1b' (see /api/tags); others are 404",
    minLength=1,
    maxLength=300,
    example="llama3.2:1b",
)
_STRING_OR_LIST = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_FORMAT = {
    "description": '"json", or a JSON schema object the output must follow',
    "oneOf": [{"type": "string", "enum": ["", "json"]}, {"type": "object"}],
}


def _schemas() -> dict[str, Schema]:
    ollama_options = _obj(
        {
            "temperature": _number(0, 100),
            "top_p": _number(0, 1),
            "top_k": _int(0, INT32_MAX),
            "num_predict": _int(-2, INT32_MAX, "tokens to generate; -1 = until done"),
            "num_ctx": _int(1, INT32_MAX),
            "seed": _int(-(2**63), INT64_MAX),
            "stop": _STRING_OR_LIST,
        },
        description="Ollama's model options; others are passed to the model server as given",
        additionalProperties=True,
    )
    message = _obj(
        {
            "role": _string(enum=["system", "user", "assistant", "tool"]),
            "content": _string(),
            "images": {"type": "array", "items": _string("base64 image")},
            "tool_calls": {"type": "array", "items": {"type": "object"}},
        },
        ("role",),
    )
    common = {
        "model": _MODEL,
        "stream": {"type": "boolean", "default": True},
        "format": _FORMAT,
        "options": _ref("OllamaOptions"),
        "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        "think": {"type": "boolean"},
    }
    openai_message = _obj(
        {
            "role": _string(enum=["system", "developer", "user", "assistant", "tool"]),
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object"}},
                    {"type": "null"},
                ]
            },
            "name": _string(),
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": _string(),
        },
        ("role",),
    )
    openai_sampling = {
        "temperature": _number(0, 2),
        "top_p": _number(0, 1),
        "seed": _int(-(2**63), INT64_MAX),
        "max_tokens": _int(1, INT32_MAX),
        "max_completion_tokens": _int(1, INT32_MAX),
        "stop": _STRING_OR_LIST,
        "n": {"type": "integer", "enum": [1]},
        "presence_penalty": _number(-2, 2),
        "frequency_penalty": _number(-2, 2),
        "stream": {"type": "boolean", "default": False},
        "stream_options": _obj({"include_usage": {"type": "boolean"}}),
    }
    return {
        "OllamaOptions": ollama_options,
        "OllamaMessage": message,
        "OllamaChatRequest": _obj(
            {
                **common,
                "messages": {"type": "array", "items": _ref("OllamaMessage")},
                "tools": {"type": "array", "items": {"type": "object"}},
            },
            ("model",),
            description="Ollama /api/chat; no messages = load the model (answered at once)",
        ),
        "OllamaGenerateRequest": _obj(
            {
                **common,
                "prompt": _string(),
                "suffix": _string(),
                "system": _string(),
                "images": {"type": "array", "items": _string("base64 image")},
                "raw": {"type": "boolean"},
            },
            ("model",),
            description="Ollama /api/generate; no prompt = load the model (answered at once)",
        ),
        "OllamaEmbedRequest": _obj(
            {
                "model": _MODEL,
                "input": _STRING_OR_LIST,
                "truncate": {"type": "boolean", "default": True},
                "dimensions": _int(0, INT32_MAX),
                "options": _ref("OllamaOptions"),
                "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
            },
            ("model", "input"),
        ),
        "OllamaEmbeddingsRequest": _obj(
            {"model": _MODEL, "prompt": _string(), "options": _ref("OllamaOptions")},
            ("model", "prompt"),
            description="Ollama's legacy /api/embeddings",
        ),
        "OllamaShowRequest": _obj(
            {
                "model": _MODEL,
                "name": _string("older clients' name for model"),
                "verbose": {"type": "boolean"},
            }
        ),
        "OllamaError": _obj(
            {
                "error": _string("the message (or, for queue_full and timeout, the code)"),
                "code": _string("machine-readable: invalid_request, unauthorized, ..."),
                "field": _string("the request field at fault, for bad input"),
                "message": _string(),
                "model": _string(),
            },
            ("error",),
        ),
        "OpenAIMessage": openai_message,
        "OpenAIChatRequest": _obj(
            {
                "model": _MODEL,
                "messages": {"type": "array", "items": _ref("OpenAIMessage"), "minItems": 1},
                "tools": {"type": "array", "items": {"type": "object"}},
                "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
                "response_format": _obj(
                    {"type": _string(enum=["text", "json_object", "json_schema"])}
                ),
                **openai_sampling,
            },
            ("model", "messages"),
        ),
        "OpenAICompletionRequest": _obj(
            {"model": _MODEL, "prompt": _STRING_OR_LIST, "suffix": _string(), **openai_sampling},
            ("model", "prompt"),
        ),
        "OpenAIEmbeddingsRequest": _obj(
            {
                "model": _MODEL,
                "input": _STRING_OR_LIST,
                "encoding_format": _string(enum=["float", "base64"]),
                "dimensions": _int(1, INT32_MAX),
            },
            ("model", "input"),
        ),
        "OpenAIError": _obj(
            {
                "error": _obj(
                    {
                        "message": _string(),
                        "type": _string(),
                        "param": {"type": "string", "nullable": True},
                        "code": {"type": "string", "nullable": True},
                    },
                    ("message",),
                )
            },
            ("error",),
        ),
        "QueueRequestStatus": _obj(
            {
                "id": _string(),
                "state": _string(),
                "position": {"type": "integer"},
                "queue_length": {"type": "integer"},
                "eta": {"type": "object"},
                "message": _string('"You are #3 of 7 in the queue • Estimated wait: 2–3 minutes"'),
                "switch_offered": {"type": "boolean"},
                "watch_token": _string(),
            },
            description="A request as a person waiting sees it",
        ),
        "ModelRequest": _obj({"model": _MODEL}, ("model",)),
    }


_CONTROL_HEADERS: list[Schema] = [
    {
        "name": "X-Usher-Priority",
        "in": "header",
        "schema": _string(enum=["critical", "high", "normal", "low", "batch"]),
        "description": "priority class (capped by the tenant's limits)",
    },
    {
        "name": "X-Usher-Fallback",
        "in": "header",
        "schema": _string(enum=["none", "after_timeout", "local_only"]),
        "description": "whether the request may go to the external provider",
    },
    {
        "name": "X-Usher-Queue-Timeout",
        "in": "header",
        "schema": _string(
            "seconds it may wait in the queue (at most 86400)",
            pattern="^[0-9]{1,5}(\\.[0-9]{1,3})?$",
        ),
    },
    {
        "name": "X-Usher-Deadline",
        "in": "header",
        "schema": _string(
            "seconds until the answer is of no use", pattern="^[0-9]{1,5}(\\.[0-9]{1,3})?$"
        ),
    },
    {
        "name": "Idempotency-Key",
        "in": "header",
        "schema": _string(
            "a retried request with the same key gets the first one's answer",
            pattern="^[!-~]{1,128}$",
        ),
    },
]

_ID_PARAMETER: Schema = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": _string(
        "a request id (26 characters, Crockford base32)", example="01JEXAMPLE0000000000000000"
    ),
}


def _errors(*statuses: int, openai: bool = False) -> dict[str, Schema]:
    shape = _ref("OpenAIError" if openai else "OllamaError")
    meaning = {
        400: "bad input; the body names the field",
        401: "no or unknown token",
        403: "not allowed (another tenant's request, or not an admin)",
        404: "no such model or request",
        408: "the request was not sent within the read timeout",
        409: "the request already finished, or cannot be switched",
        413: "the body is too large",
        429: "rate limited (or, for OpenAI clients, the queue is full); see Retry-After",
        501: "not offered by the gateway",
        502: "the model server failed",
        503: "the queue is full or a service is unavailable; see Retry-After",
        504: "the queue timeout or deadline passed",
    }
    return {
        str(code): {"description": meaning[code], "content": {JSON: {"schema": shape}}}
        for code in statuses
    }


_MODEL_ERRORS = (400, 401, 403, 404, 408, 409, 413, 429, 502, 503, 504)


_QUESTION = "Why is the sky blue?"
#: A request of each kind, as a user would send it (also the first cases schemathesis tries).
EXAMPLES: dict[str, dict[str, Any]] = {
    "OllamaChatRequest": {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": _QUESTION}],
        "stream": False,
    },
    "OllamaGenerateRequest": {"model": "llama3.2:1b", "prompt": _QUESTION, "stream": True},
    "OllamaEmbedRequest": {"model": "nomic-embed-text", "input": [_QUESTION]},
    "OllamaEmbeddingsRequest": {"model": "nomic-embed-text", "prompt": _QUESTION},
    "OpenAIChatRequest": {
        "model": "llama3.2:1b",
        "messages": [{"role": "user", "content": _QUESTION}],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "OpenAICompletionRequest": {"model": "llama3.2:1b", "prompt": _QUESTION, "max_tokens": 16},
    "OpenAIEmbeddingsRequest": {"model": "nomic-embed-text", "input": _QUESTION},
}


def _model_route(summary: str, schema: str, streams: str | None, *, openai: bool = False) -> Schema:
    content: dict[str, Schema] = {JSON: {"schema": {"type": "object"}}}
    if streams:
        content[streams] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "tags": ["OpenAI" if openai else "Ollama"],
            "parameters": _CONTROL_HEADERS,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref(schema), "example": EXAMPLES[schema]}},
            },
            "responses": {
                "200": {
                    "description": "the answer (streamed when `stream` is true)",
                    "headers": {
                        "X-Usher-Request-Id": {"schema": {"type": "string"}},
                        "X-Usher-Queue-Wait-Ms": {"schema": {"type": "string"}},
                    },
                    "content": content,
                },
                **_errors(*_MODEL_ERRORS, openai=openai),
            },
        }
    }


def _get(summary: str, tag: str, *errors: int, content_type: str = JSON, **extra: Any) -> Schema:
    return {
        "get": {
            "summary": summary,
            "tags": [tag],
            **extra,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        content_type: {
                            "schema": {"type": "object"}
                            if content_type == JSON
                            else {"type": "string"}
                        }
                    },
                },
                **_errors(*errors),
            },
        }
    }


def _post(
    summary: str, tag: str, schema: Schema | None, *errors: int, status: int = 200, **extra: Any
) -> Schema:
    operation: Schema = {"summary": summary, "tags": [tag], **extra}
    if schema is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    operation["responses"] = {
        str(status): {"description": "OK", "content": {JSON: {"schema": {"type": "object"}}}},
        **_errors(*errors),
    }
    return {"post": operation}


#: A browser's credential for one stream (EventSource and WebSocket send no headers);
#: also accepted as the ``usher_watch`` cookie the submit sets.
_WATCH_TOKEN: Schema = {
    "name": "watch_token",
    "in": "query",
    "description": "short-lived token from X-Usher-Watch-Token (one request, or the badges)",
    "schema": _string(),
}
#: Resume after this event (nothing twice).
_LAST_EVENT_ID: Schema = {
    "name": "last_event_id",
    "in": "query",
    "schema": _string(pattern="^[0-9]{1,15}-[0-9]{1,15}$"),
}
_BADGE_MODELS: Schema = {
    "name": "model",
    "in": "query",
    "description": "models to badge, comma-separated or repeated (all when none; at most 100)",
    "schema": _string(),
}


def _paths() -> dict[str, Schema]:
    paths: dict[str, Schema] = {
        "/": _get("'Ollama is running'", "Ollama", content_type="text/plain"),
        "/api/version": _get("Ollama version this gateway speaks", "Ollama"),
        "/api/tags": _get("models the fleet has (every local instance, once)", "Ollama", 503),
        "/api/ps": _get("models loaded across the fleet", "Ollama", 503),
        "/api/show": _post(
            "a model's details", "Ollama", _ref("OllamaShowRequest"), 400, 404, 408, 413, 503
        ),
        "/api/chat": _model_route("chat (NDJSON when streamed)", "OllamaChatRequest", NDJSON),
        "/api/generate": _model_route(
            "generate (NDJSON when streamed)", "OllamaGenerateRequest", NDJSON
        ),
        "/api/embed": _model_route("embeddings", "OllamaEmbedRequest", None),
        "/api/embeddings": _model_route(
            "embeddings (legacy shape)", "OllamaEmbeddingsRequest", None
        ),
        "/v1/chat/completions": _model_route(
            "chat completion (SSE when streamed)", "OpenAIChatRequest", SSE, openai=True
        ),
        "/v1/completions": _model_route(
            "text completion (SSE when streamed)", "OpenAICompletionRequest", SSE, openai=True
        ),
        "/v1/embeddings": _model_route("embeddings", "OpenAIEmbeddingsRequest", None, openai=True),
        "/v1/models": _get("models the fleet serves", "OpenAI", 503),
        "/v1/models/{model}": _get(
            "one model",
            "OpenAI",
            404,
            503,
            parameters=[{"name": "model", "in": "path", "required": True, "schema": _string()}],
        ),
        "/queue/stats": _get(
            "queue statistics: everything for an admin token, a model picker's figures for others",
            "Queue",
            401,
            403,
            404,
            503,
            parameters=[{"name": "model", "in": "query", "schema": _string()}],
        ),
        "/queue/memory": _get("this machine's memory and the slots it suggests", "Queue"),
        "/health": _get("the services' health and the fleet's (503 when degraded)", "Queue", 503),
        "/metrics": _get("Prometheus metrics of the gateway", "Queue", content_type="text/plain"),
        "/admin/queue/update": _post(
            "change a model's queue limits (admin)",
            "Admin",
            _obj(
                {
                    "model": _MODEL,
                    "queue_limit": _int(1, INT32_MAX),
                    "parallel_limit": _int(1, INT32_MAX),
                    "max_attempts": _int(1, INT32_MAX),
                    "queue_timeout": _number(0.001, 86400, "seconds"),
                },
                ("model",),
            ),
            400,
            401,
            403,
            408,
            413,
            503,
        ),
        "/admin/queue/reset": _post(
            "restart this gateway's processed / rejected counts (admin)",
            "Admin",
            _obj({"model": _string()}),
            400,
            401,
            403,
            408,
            413,
            503,
        ),
        "/admin/overview": _get(
            "queues, instances and dead letters (admin)", "Admin", 401, 403, 503
        ),
        "/admin/queue/pause": _post(
            "pause or resume a model's queue (admin)",
            "Admin",
            _obj({"model": _MODEL, "paused": {"type": "boolean"}}, ("model",)),
            400,
            401,
            403,
            408,
            413,
            503,
        ),
        "/admin/queue/drain": _post(
            "end every queued request of a model (admin)",
            "Admin",
            _obj({"model": _MODEL, "reason": _string()}, ("model",)),
            400,
            401,
            403,
            408,
            413,
            503,
        ),
        "/queue/requests": _post(
            "queue a chat request and answer at once with its place (202)",
            "Queue",
            _ref("OpenAIChatRequest"),
            400,
            401,
            403,
            404,
            408,
            413,
            429,
            503,
            status=202,
            parameters=_CONTROL_HEADERS,
        ),
        "/queue/requests/{id}": {
            **_get(
                "a request's status now",
                "Queue",
                400,
                401,
                403,
                404,
                503,
                parameters=[_ID_PARAMETER],
            ),
            "delete": {
                "summary": "cancel a request",
                "tags": ["Queue"],
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "200": {
                        "description": "cancelled",
                        "content": {JSON: {"schema": _ref("QueueRequestStatus")}},
                    },
                    **_errors(400, 401, 403, 404, 409, 503),
                },
            },
        },
        "/queue/requests/{id}/switch": _post(
            "move a queued request to the external provider",
            "Queue",
            None,
            400,
            401,
            403,
            404,
            409,
            503,
            parameters=[_ID_PARAMETER],
        ),
        "/queue/requests/{id}/events": _get(
            "the request's updates as Server-Sent Events until it ends",
            "Queue",
            400,
            401,
            403,
            404,
            503,
            content_type=SSE,
            parameters=[
                _ID_PARAMETER,
                _WATCH_TOKEN,
                _LAST_EVENT_ID,
                {**_LAST_EVENT_ID, "name": "Last-Event-ID", "in": "header"},
            ],
        ),
        "/queue/requests/{id}/ws": _get(
            "the same updates over a WebSocket (upgrade required)",
            "Queue",
            400,
            401,
            403,
            404,
            503,
            parameters=[_ID_PARAMETER, _WATCH_TOKEN, _LAST_EVENT_ID],
        ),
        "/queue/watch-tokens": _post(
            "a fresh watch token for one's own request ({request_id}) or the badges ({})",
            "Queue",
            _obj({"request_id": _string()}),
            400,
            401,
            403,
            404,
            408,
            413,
            503,
        ),
        "/queue/models/events": _get(
            "model picker badges as Server-Sent Events (endless)",
            "Queue",
            400,
            401,
            503,
            content_type=SSE,
            parameters=[_BADGE_MODELS, _WATCH_TOKEN],
        ),
        "/queue/models/ws": _get(
            "model picker badges over a WebSocket (upgrade required)",
            "Queue",
            400,
            401,
            503,
            parameters=[_BADGE_MODELS, _WATCH_TOKEN],
        ),
        "/ui": _get(
            "the page: model picker, place in the queue, answer", "Page", content_type="text/html"
        ),
    }
    for name in ("pull", "push", "create", "copy", "delete"):
        paths[f"/api/{name}"] = {
            "post": {
                "summary": f"not offered: models are managed on the instances ({name})",
                "tags": ["Ollama"],
                "responses": _errors(501),
            }
        }
    return paths


def openapi_document(version: str = "1") -> dict[str, Any]:
    """The whole document (a fresh dict each call)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Usher gateway",
            "version": version,
            "description": "Ollama- and OpenAI-compatible routes in front of Usher's fair, "
            "durable queue, plus the queue and operator routes. Authenticate with "
            "`Authorization: Bearer <token>`; errors name the field at fault.",
        },
        "security": [{"bearer": []}, {}],
        "tags": [
            {"name": "Ollama"},
            {"name": "OpenAI"},
            {"name": "Queue"},
            {"name": "Admin"},
            {"name": "Page"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
