"""The gateway's pure functions: HTTP bodies and headers → Submit, results → Ollama and
OpenAI shapes, gRPC statuses → HTTP errors, fleet and queue views. No processes."""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from services.gateway import views
from services.gateway.bodies import decode_json
from services.gateway.controls import apply_controls, parse_controls
from services.gateway.errors import (
    GatewayError,
    error_from_request,
    error_from_rpc,
    ollama_error_body,
    openai_error_body,
    openai_status,
)
from services.gateway.flow import continuation
from services.gateway.ollama_shapes import (
    ollama_chat,
    ollama_chunk,
    ollama_embed,
    ollama_embed_response,
    ollama_embeddings,
    ollama_embeddings_response,
    ollama_final,
    ollama_generate,
)
from services.gateway.openai_shapes import (
    openai_chat,
    openai_completion,
    openai_embeddings,
    openai_embeddings_response,
)
from services.gateway.settings import GatewaySettings, split_listen
from usher.config import ConfigError
from usher.errors import FieldViolation, InvalidArgument, ResourceExhausted
from usher.structs import plain_json
from usher.v1 import pool_pb2, request_pb2, scheduler_pb2


def trailing_of(error: Exception) -> list[tuple[str, str | bytes]]:
    """The trailing metadata a gRPC server sends for an usher.errors exception."""
    assert isinstance(error, InvalidArgument | ResourceExhausted)
    return [(k, v) for k, v in error.to_status().trailing_metadata]


def finished(**usage: Any) -> request_pb2.LlmRequest:
    request = request_pb2.LlmRequest(
        id="01ABCDEFGHJKMNPQRSTVWXYZ00",
        model="llama3.2:1b",
        state=request_pb2.REQUEST_STATE_COMPLETED,
        result=request_pb2.RequestResult(text="Hello there", done_reason="stop"),
        usage=request_pb2.Usage(
            prompt_tokens=usage.get("prompt", 9),
            completion_tokens=usage.get("completion", 20),
            tokens_per_second=usage.get("tps", 100.0),
        ),
    )
    request.usage.queue_wait.FromMilliseconds(usage.get("wait_ms", 300))
    request.usage.processing.FromMilliseconds(usage.get("processing_ms", 500))
    request.usage.load.FromMilliseconds(usage.get("load_ms", 100))
    return request


# -- request bodies ------------------------------------------------------------------------


def test_ollama_chat_maps_messages_options_and_extras() -> None:
    parsed = ollama_chat(
        {
            "model": "llama3.2:1b",
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "User", "content": "hi", "images": ["aGk="]},
            ],
            "format": {"type": "object"},
            "options": {"temperature": 0.2, "num_predict": 40, "stop": "###", "mirostat": 2},
            "think": True,
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    submit = parsed.submit
    assert parsed.stream is True and parsed.kind == "chat" and not parsed.shortcut
    assert [m.role for m in submit.chat.messages] == ["system", "user"]
    assert list(submit.chat.messages[1].images) == ["aGk="]
    assert json.loads(submit.chat.format) == {"type": "object"}
    assert submit.options.temperature == pytest.approx(0.2)
    assert submit.options.num_predict == 40
    assert list(submit.options.stop) == ["###"]
    extra = plain_json(dict(submit.options.extra))
    assert extra == {"mirostat": 2, "think": True}
    assert len(submit.chat.tools) == 1


def test_ollama_generate_and_its_load_and_unload_shortcuts() -> None:
    parsed = ollama_generate(
        {"model": "qwen2.5:0.5b", "prompt": "Why?", "system": "s", "raw": True, "stream": False}
    )
    assert parsed.stream is False and parsed.submit.generate.prompt == "Why?"
    assert parsed.submit.generate.raw and parsed.submit.generate.system == "s"
    assert ollama_generate({"model": "m"}).shortcut == "load"
    assert ollama_generate({"model": "m", "keep_alive": 0}).shortcut == "unload"
    assert ollama_chat({"model": "m", "messages": []}).shortcut == "load"


def test_embed_bodies() -> None:
    embed = ollama_embed({"model": "nomic-embed-text", "input": "one", "dimensions": 64})
    assert list(embed.submit.embed.input) == ["one"]
    assert embed.submit.embed.truncate is True  # Ollama's default
    assert embed.submit.embed.dimensions == 64
    legacy = ollama_embeddings({"model": "nomic-embed-text", "prompt": "x"})
    assert legacy.kind == "embeddings" and list(legacy.submit.embed.input) == ["x"]
    assert ollama_embeddings({"model": "nomic-embed-text"}).shortcut == "load"
    openai = openai_embeddings({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    assert openai.encoding_format == "base64" and list(openai.submit.embed.input) == ["a", "b"]


def test_openai_chat_body() -> None:
    parsed = openai_chat(
        {
            "model": "llama3.2:1b",
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
            ],
            "max_tokens": 12,
            "seed": 7,
            "stop": ["a", "b"],
            "presence_penalty": 0.5,
            "response_format": {"type": "json_object"},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    messages = parsed.submit.chat.messages
    assert [(m.role, m.content, list(m.images)) for m in messages] == [
        ("system", "rules", []),
        ("user", "look", []),
        ("user", "", ["iVBO"]),
        ("assistant", "", []),
    ]
    options = parsed.submit.options
    assert (options.num_predict, options.seed, list(options.stop)) == (12, 7, ["a", "b"])
    assert plain_json(dict(options.extra)) == {"presence_penalty": 0.5}
    assert parsed.submit.chat.format == "json"
    assert parsed.stream and parsed.include_usage


@pytest.mark.parametrize(
    ("parse", "body", "field"),
    [
        (ollama_chat, {"messages": []}, "model"),
        (ollama_chat, {"model": "bad name!", "messages": []}, "model"),
        (ollama_chat, {"model": "m", "messages": "hi"}, "messages"),
        (
            ollama_chat,
            {"model": "m", "messages": [{"role": "x", "content": ""}]},
            "messages[0].role",
        ),
        (ollama_chat, {"model": "m", "messages": [], "stream": "yes"}, "stream"),
        (ollama_generate, {"model": "m", "prompt": 3}, "prompt"),
        (
            ollama_generate,
            {"model": "m", "prompt": "p", "options": {"seed": 1.5}},
            "options.seed",
        ),
        (
            ollama_generate,
            {"model": "m", "prompt": "p", "options": {"top_p": "x"}},
            "options.top_p",
        ),
        (ollama_generate, {"model": "m", "prompt": "p", "format": 3}, "format"),
        (ollama_embed, {"model": "m", "input": [1, 2]}, "input"),
        (openai_chat, {"model": "m", "messages": []}, "messages"),
        (
            openai_chat,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2},
            "n",
        ),
        (
            openai_chat,
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ],
            },
            "messages[0].content[0].image_url",
        ),
        (openai_embeddings, {"model": "m", "input": [[1, 2]]}, "input"),
        (
            openai_embeddings,
            {"model": "m", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
    ],
)
def test_bad_bodies_name_the_field(parse: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse(body)
    assert info.value.status == 400
    assert info.value.field == field


def test_decode_json() -> None:
    assert decode_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"{", b"[1]"):
        with pytest.raises(GatewayError) as info:
            decode_json(raw)
        assert info.value.field == "body"


# -- headers -------------------------------------------------------------------------------


def test_controls_from_headers() -> None:
    controls = parse_controls(
        {
            "X-Usher-Priority": "High",
            "X-Usher-Fallback": "after-timeout",
            "X-Usher-Queue-Timeout": "2.5",
            "X-Usher-Deadline": "30",
            "Idempotency-Key": "abc-1",
        }
    )
    submit = scheduler_pb2.SubmitRequest(model="m")
    apply_controls(submit, controls, now=1000.0)
    assert submit.priority == request_pb2.PRIORITY_HIGH
    assert submit.fallback_policy == request_pb2.FALLBACK_POLICY_AFTER_TIMEOUT
    assert submit.queue_timeout.ToMilliseconds() == 2500
    assert submit.deadline.ToMilliseconds() == 1_030_000
    assert submit.idempotency_key == "abc-1"
    empty = scheduler_pb2.SubmitRequest(model="m")
    apply_controls(empty, parse_controls({}), now=0)
    assert not empty.HasField("queue_timeout") and empty.priority == 0


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Usher-Priority", "urgent"),
        ("X-Usher-Fallback", "cloud"),
        ("X-Usher-Queue-Timeout", "soon"),
        ("X-Usher-Queue-Timeout", "-1"),
        ("X-Usher-Deadline", "nan"),
    ],
)
def test_bad_headers_are_named(header: str, value: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_controls({header: value})
    assert info.value.status == 400 and info.value.field == header


# -- errors ----------------------------------------------------------------------------------


def test_queue_full_maps_to_503_with_retry_after_and_429_for_openai() -> None:
    status = ResourceExhausted("the queue for model 'm' is full (5 waiting)", 2.2)
    error = error_from_rpc(
        grpc.StatusCode.RESOURCE_EXHAUSTED, status.message, trailing_of(status), model="m"
    )
    assert (error.status, error.code, error.retry_after_header()) == (503, "queue_full", "3")
    body = ollama_error_body(error)
    assert body["error"] == "queue_full" and body["model"] == "m" and "message" in body
    assert openai_status(error) == 429
    assert openai_error_body(error)["error"]["type"] == "rate_limit_error"
    limited = error_from_rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: at most 5")
    assert (limited.status, limited.code) == (429, "rate_limited")


def test_invalid_argument_names_the_http_field() -> None:
    status = InvalidArgument(
        [FieldViolation("generate.prompt", "must not be empty"), FieldViolation("priority", "x")]
    )
    error = error_from_rpc(grpc.StatusCode.INVALID_ARGUMENT, status.message, trailing_of(status))
    assert (error.status, error.field) == (400, "prompt")
    assert error.message.startswith("prompt: must not be empty")
    openai = openai_error_body(error)["error"]
    assert openai == {
        "message": error.message,
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_request",
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_other_statuses(code: grpc.StatusCode, status: int) -> None:
    assert error_from_rpc(code, "x").status == status


def test_terminal_states_map_to_errors() -> None:
    request = request_pb2.LlmRequest(model="m", state=request_pb2.REQUEST_STATE_EXPIRED)
    expired = error_from_request(request)
    assert expired is not None and (expired.status, expired.code) == (504, "timeout")
    assert ollama_error_body(expired)["error"] == "timeout"
    request.state = request_pb2.REQUEST_STATE_FAILED
    request.error = "llama runner crashed"
    failed = error_from_request(request)
    assert failed is not None and failed.status == 500 and "crashed" in failed.message
    request.state = request_pb2.REQUEST_STATE_COMPLETED
    assert error_from_request(request) is None


# -- answers ---------------------------------------------------------------------------------


def test_ollama_final_chunk_has_ollamas_fields_in_nanoseconds() -> None:
    request = finished()
    final = ollama_final("generate", "llama3.2", request, stream=False)
    assert final["response"] == "Hello there" and final["done"] is True
    assert final["done_reason"] == "stop" and final["model"] == "llama3.2"
    assert final["total_duration"] == 800_000_000  # queue wait + processing
    assert final["load_duration"] == 100_000_000
    assert final["eval_count"] == 20 and final["eval_duration"] == 200_000_000
    assert final["prompt_eval_count"] == 9
    assert final["prompt_eval_duration"] == 200_000_000
    assert final["created_at"].endswith("Z")
    streamed = ollama_final("chat", "llama3.2", request, stream=True)
    assert streamed["message"] == {"role": "assistant", "content": ""}
    chunk = ollama_chunk("chat", "m", "tok", datetime(2025, 1, 1, tzinfo=UTC))
    assert chunk == {
        "model": "m",
        "created_at": "2025-01-01T00:00:00.000000Z",
        "message": {"role": "assistant", "content": "tok"},
        "done": False,
    }
    assert "eval_count" not in ollama_final(
        "generate", "m", finished(completion=0, tps=0.0), stream=False
    )


def test_chat_result_message_and_tool_calls() -> None:
    request = finished()
    message = struct_pb2.Struct()
    message.update(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Oslo", "n": 2}}}
            ],
        }
    )
    request.result.message.CopyFrom(message)
    final = ollama_final("chat", "m", request, stream=False)
    assert final["message"]["content"] == "Hello there"
    assert final["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "n": 2}
    completion = openai_completion("chatcmpl-1", 1, "m", request)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {
        "city": "Oslo",
        "n": 2,
    }
    assert completion["usage"] == {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}


def test_embedding_answers() -> None:
    request = finished()
    request.result.embeddings.add(values=[0.5, -1.0])
    assert ollama_embed_response("e", request)["embeddings"] == [[0.5, -1.0]]
    assert ollama_embeddings_response(request) == {"embedding": [0.5, -1.0]}
    body = openai_embeddings_response("e", request, "base64")
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert list(struct.unpack("<2f", raw)) == [0.5, -1.0]
    assert openai_embeddings_response("e", request, "float")["data"][0]["embedding"] == [
        0.5,
        -1.0,
    ]


def test_continuation_after_a_restart() -> None:
    assert continuation("", "Hel") == "Hel"
    assert continuation("Hello", "Hel") == ""  # the new run has not caught up yet
    assert continuation("Hello", "Hello, world") == ", world"
    assert continuation("Hello", "Howdy") is None


# -- views -------------------------------------------------------------------------------------


def fleet() -> list[pool_pb2.InstanceStatus]:
    a = pool_pb2.InstanceStatus(
        config=pool_pb2.InstanceConfig(id="a", base_url="http://a"),
        available_models=["llama3.2:1b", "nomic-embed-text:latest"],
        parallel=2,
    )
    loaded = a.loaded.add(name="llama3.2:1b", size_bytes=10, size_vram_bytes=5, context_length=4096)
    loaded.expires_at.FromSeconds(1_700_000_000)
    b = pool_pb2.InstanceStatus(
        config=pool_pb2.InstanceConfig(id="b", base_url="http://b"),
        available_models=["llama3.2:1b", "qwen2.5:0.5b"],
    )
    b.loaded.add(name="llama3.2:1b", size_bytes=12, size_vram_bytes=6, context_length=4096)
    external = pool_pb2.InstanceStatus(
        config=pool_pb2.InstanceConfig(id="ext", external=True), available_models=["gpt-4o"]
    )
    return [a, b, external]


def test_catalogue_and_model_resolution() -> None:
    known = views.catalogue(fleet())
    assert known == {
        "llama3.2:1b": ["a", "b"],
        "nomic-embed-text:latest": ["a"],
        "qwen2.5:0.5b": ["b"],
    }
    assert views.resolve_model("nomic-embed-text", known) == "nomic-embed-text:latest"
    assert views.resolve_model("llama3.2:1b", known) == "llama3.2:1b"
    assert views.resolve_model("gpt-4o", known) is None  # external only
    assert views.resolve_model("nope", known) is None


def test_tags_ps_and_models_bodies() -> None:
    tags = views.tags_body(fleet(), {"qwen2.5:0.5b": {"size": 7, "digest": "d", "details": {}}})
    names = [m["name"] for m in tags["models"]]
    assert names == ["llama3.2:1b", "nomic-embed-text:latest", "qwen2.5:0.5b"]
    assert tags["models"][0]["size"] == 12 and tags["models"][2]["digest"] == "d"
    (llama,) = views.ps_body(fleet())["models"]
    assert llama["instances"] == ["a", "b"] and llama["size"] == 12 and llama["size_vram"] == 6
    assert llama["expires_at"].startswith("2023-11-14T22:13:20")
    assert [m["id"] for m in views.openai_models_body(fleet())["data"]] == names


def test_queue_stats_in_the_guard_proxys_shape() -> None:
    queue = scheduler_pb2.QueueStats(
        config=scheduler_pb2.QueueConfig(model="llama3.2:1b", max_queue_size=10, parallel=1),
        queued=3,
        running=2,
        completed=40,
        rejected=5,
    )
    queue.avg_queue_wait.FromMilliseconds(45)
    queue.avg_service_time.FromMilliseconds(2340)
    model_stats = pool_pb2.ModelStats(model="llama3.2:1b", capacity=4, active=2)
    body = views.queue_stats_body(
        [queue],
        [model_stats, pool_pb2.ModelStats(model="qwen2.5:0.5b", capacity=2)],
        default_parallel=1,
        default_queue_limit=100,
        uptime_seconds=12.7,
    )
    assert body["total_models"] == 2 and body["default_queue_limit"] == 100
    llama = body["models"]["llama3.2:1b"]
    expected = {
        "model": "llama3.2:1b",
        "parallel_limit": 4,
        "queue_limit": 10,
        "active_requests": 2,
        "queued_requests": 3,
        "available_slots": 2,
        "queue_available": 7,
        "total_processed": 40,
        "total_rejected": 5,
        "avg_wait_time_ms": 45.0,
        "avg_processing_time_ms": 2340.0,
        "uptime_seconds": 12,
    }
    assert {k: llama[k] for k in expected} == expected
    assert body["models"]["qwen2.5:0.5b"]["queue_limit"] == 100


def test_memory_body() -> None:
    gib = views.GIB
    assert views.memory_body(32 * gib, 18 * gib, 14 * gib, 43.75, 4) == {
        "total_gb": 32.0,
        "available_gb": 18.0,
        "used_gb": 14.0,
        "percent": 43.8,
        "recommended_parallel": 4,
    }


def test_settings() -> None:
    base = {"USHER_SERVICE_TOKEN": "s"}
    settings = GatewaySettings.from_env(
        {**base, "USHER_GATEWAY_LISTEN": "0.0.0.0:9000", "USHER_GATEWAY_DEFAULT_TOKEN": "t"}
    )
    assert split_listen(settings.listen) == ("0.0.0.0", 9000)
    assert settings.default_token == "t"
    assert split_listen("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ConfigError, match="USHER_GATEWAY_LISTEN"):
        GatewaySettings.from_env({**base, "USHER_GATEWAY_LISTEN": "nowhere"})
    with pytest.raises(ConfigError, match="USHER_GATEWAY_RPC_TIMEOUT_SECONDS"):
        GatewaySettings.from_env({**base, "USHER_GATEWAY_RPC_TIMEOUT_SECONDS": "0"})
    with pytest.raises(ConfigError, match="USHER_SERVICE_TOKEN"):
        GatewaySettings.from_env({})


def test_grpc_transport_text_never_reaches_the_caller() -> None:
    down = error_from_rpc(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:50051: "
        "Failed to connect to remote host: Connection refused",
    )
    assert down.status == 503 and "10.0.0.5" not in down.message
    crashed = error_from_rpc(grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>: 'x'")
    assert crashed.status == 500 and crashed.message == "internal error"
    ours = error_from_rpc(grpc.StatusCode.UNAVAILABLE, "the queue store is unreachable")
    assert ours.message == "the queue store is unreachable"
