"""Pure pieces of the emulator: durations, config, text generation, request
decoding, and the scheduler driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usher.emulator import (
    EmulatorConfig,
    EmulatorStats,
    ModelSpec,
    Scheduler,
    model_spec,
    parse_go_duration,
    parse_keep_alive,
    parse_model_list,
)
from usher.emulator.cli import build_config, parse_args
from usher.emulator.config import canonical_model_name
from usher.emulator.durations import (
    DurationError,
    format_rfc3339,
    human_bytes2,
    parse_keep_alive_setting,
    parse_size,
)
from usher.emulator.engine import ApiError
from usher.emulator.protocol import decode_body, parse_chat, parse_generate, parse_options
from usher.emulator.scheduler import ModelLoadError, QueueFullError
from usher.emulator.textgen import count_tokens, embedding, natural_length, text_tokens

from .helpers import GiB, fast_config, gib_models

# -- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("5m", 300 * 10**9),
        ("0", 0),
        ("-0", 0),
        ("1h30m", 5400 * 10**9),
        ("1.5s", 1_500_000_000),
        ("300ms", 300_000_000),
        ("-1m", -60 * 10**9),
        ("2us", 2000),
        ("7ns", 7),
    ],
)
def test_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("5", 'time: missing unit in duration "5"'),
        ("", 'time: invalid duration ""'),
        ("abc", 'time: invalid duration "abc"'),
        ("5y", 'time: unknown unit "y" in duration "5y"'),
    ],
)
def test_go_duration_errors_match_go(text: str, message: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_go_duration(text)
    assert str(info.value) == message


@given(st.integers(min_value=0, max_value=10_000), st.sampled_from(["ns", "ms", "s", "m", "h"]))
def test_go_duration_property(value: int, unit: str) -> None:
    scale = {"ns": 1, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}[unit]
    assert parse_go_duration(f"{value}{unit}") == value * scale


def test_keep_alive_values() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-1m") == math.inf
    with pytest.raises(DurationError, match="missing unit"):
        parse_keep_alive("-1")
    with pytest.raises(DurationError, match="Unsupported type: 'bool'"):
        parse_keep_alive(True)
    # The environment variable (server default) also takes plain seconds.
    assert parse_keep_alive_setting("-1") == math.inf
    assert parse_keep_alive_setting("90") == 90
    assert parse_keep_alive_setting("2m") == 120


def test_sizes_and_formats() -> None:
    assert parse_size("4.7GB") == 4_700_000_000
    assert parse_size("8GiB") == 8 * GiB
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")
    assert human_bytes2(int(1.5 * GiB)) == "1.5 GiB"
    assert human_bytes2(512) == "512 B"
    assert format_rfc3339(datetime(2024, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)) == (
        "2024-01-02T03:04:05.12Z"
    )
    assert format_rfc3339(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05Z"


# -- config -----------------------------------------------------------------------


def test_model_names_and_catalog() -> None:
    assert canonical_model_name("llama3.2") == "llama3.2:latest"
    assert canonical_model_name("registry.ollama.ai/library/Qwen2.5:0.5B") == "qwen2.5:0.5b"
    spec = model_spec("qwen2.5:0.5b")
    assert spec.family == "qwen2"
    assert spec.context_length == 32768
    big = model_spec("mystery:7b@2GiB")
    assert big.size == 2 * GiB
    assert big.parameter_size == "7B"
    guessed = model_spec("mystery:13b")
    assert guessed.size == int(13e9 * 0.6)
    assert model_spec("my-embed-model").is_embedding
    assert [s.name for s in parse_model_list("llama3.2:1b, nomic-embed-text")] == [
        "llama3.2:1b",
        "nomic-embed-text:latest",
    ]


def test_config_round_trip() -> None:
    cfg = fast_config(default_keep_alive=math.inf, memory_budget=3 * GiB)
    cfg.faults.update({"fail_next": 2})
    again = EmulatorConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.default_keep_alive == math.inf
    with pytest.raises(ValueError, match="unknown config fields"):
        EmulatorConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown fault fields"):
        cfg.faults.update({"explode": True})


# -- text -------------------------------------------------------------------------


def test_text_is_deterministic_and_seed_sensitive() -> None:
    a = text_tokens("key", 0, 20)
    assert a == text_tokens("key", 0, 20)
    assert a != text_tokens("key", 1, 20)
    assert text_tokens("key", 0, 5)[:4] == a[:4]  # a shorter run is a prefix
    assert "".join(a).endswith(".")
    assert 3 <= natural_length("k", 0, 3, 9) <= 9
    assert count_tokens("") == 0
    assert count_tokens("abcdefgh") == 2


def test_embeddings_are_unit_vectors() -> None:
    v = embedding("hello", 64)
    assert v == embedding("hello", 64)
    assert v != embedding("hello!", 64)
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9)


# -- request decoding -----------------------------------------------------------------


def test_decode_body_errors_like_gin() -> None:
    def message(raw: bytes) -> str:
        with pytest.raises(ApiError) as info:
            decode_body(raw, "GenerateRequest")
        assert info.value.status == 400
        return info.value.message

    assert message(b"") == "missing request body"
    assert message(b"   ") == "missing request body"
    assert message(b"{not json") == "invalid character 'n' looking for beginning of value"
    assert message(b'{"model": "x"') == "unexpected EOF"
    assert (
        message(b"[1]") == "json: cannot unmarshal array into Go value of type api.GenerateRequest"
    )


def test_field_type_errors() -> None:
    with pytest.raises(ApiError) as info:
        parse_generate({"model": "m", "stream": "yes"})
    assert info.value.message == (
        "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool"
    )
    with pytest.raises(ApiError) as info:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert "ChatRequest.messages.content of type string" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_generate({"model": "m", "keep_alive": "-1"})
    assert info.value.message == 'time: missing unit in duration "-1"'
    with pytest.raises(ApiError) as info:
        parse_generate({"model": "m", "think": "very"})
    assert info.value.message.startswith('invalid think value: "very"')
    with pytest.raises(ApiError) as info:
        parse_options({"num_ctx": "big"})
    assert (info.value.status, info.value.message) == (
        500,
        'option "num_ctx" must be of type integer',
    )
    p = parse_generate({"model": "m", "prompt": "hi", "stream": False, "keep_alive": "1m"})
    assert (p.stream, p.keep_alive) == (False, 60)


# -- scheduler, driven directly -----------------------------------------------------------


def _scheduler(**overrides: object) -> tuple[Scheduler, EmulatorStats, EmulatorConfig]:
    cfg = fast_config(**overrides)
    stats = EmulatorStats()
    return Scheduler(cfg, stats), stats, cfg


async def test_scheduler_slots_are_fifo() -> None:
    sched, stats, cfg = _scheduler(num_parallel=1)
    spec = cfg.models[0]
    first = await sched.acquire(spec, num_ctx=4096, keep_alive=None)
    order: list[int] = []

    async def waiter(i: int) -> None:
        lease = await sched.acquire(spec, num_ctx=4096, keep_alive=None)
        order.append(i)
        await asyncio.sleep(0)
        sched.release(lease)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert stats.queue_depth == 4
    sched.release(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert stats.model(spec.name).in_flight_max == 1
    assert stats.loads == 1
    await sched.close()


async def test_scheduler_queue_limit_and_too_big_model() -> None:
    sched, stats, cfg = _scheduler(num_parallel=1, max_queue=1)
    spec = cfg.models[0]
    held = await sched.acquire(spec, num_ctx=4096, keep_alive=None)
    queued = asyncio.create_task(sched.acquire(spec, num_ctx=4096, keep_alive=None))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await sched.acquire(spec, num_ctx=4096, keep_alive=None)
    assert stats.requests_rejected == 1
    sched.release(held)
    sched.release(await queued)
    await sched.close()

    sched, _, cfg = _scheduler(models=gib_models("huge:70b", size=40), memory_budget=8 * GiB)
    with pytest.raises(ModelLoadError, match=r"requires more system memory \(40.0 GiB\)"):
        await sched.acquire(cfg.models[0], num_ctx=4096, keep_alive=None)
    await sched.close()


async def test_scheduler_evicts_lru_idle_and_waits_for_busy() -> None:
    sched, stats, cfg = _scheduler(
        models=gib_models("a:1b", "b:1b", "c:1b"), memory_budget=int(2.5 * GiB)
    )
    a, b, c = cfg.models
    for spec in (a, b, a):  # b is now the least recently used
        sched.release(await sched.acquire(spec, num_ctx=4096, keep_alive=None))
    sched.release(await sched.acquire(c, num_ctx=4096, keep_alive=None))
    assert sorted(m.spec.name for m in sched.loaded()) == ["a:1b", "c:1b"]
    assert stats.model("b:1b").evictions == 1

    # Everything busy: the load of b waits until a victim drains.
    held_a = await sched.acquire(a, num_ctx=4096, keep_alive=None)
    held_c = await sched.acquire(c, num_ctx=4096, keep_alive=None)
    load_b = asyncio.create_task(sched.acquire(b, num_ctx=4096, keep_alive=None))
    await asyncio.sleep(0.05)
    assert not load_b.done()
    sched.release(held_a)  # a was used before c: it is the LRU victim
    sched.release(await asyncio.wait_for(load_b, 1))
    sched.release(held_c)
    assert sorted(m.spec.name for m in sched.loaded()) == ["b:1b", "c:1b"]
    await sched.close()


async def test_scheduler_reload_and_keep_alive() -> None:
    sched, stats, cfg = _scheduler()
    spec = cfg.models[0]
    sched.release(await sched.acquire(spec, num_ctx=2048, keep_alive=None))
    sched.release(await sched.acquire(spec, num_ctx=8192, keep_alive=0.05))
    assert stats.reloads == 1
    assert stats.loads == 2
    await asyncio.sleep(0.15)
    assert sched.loaded() == []
    assert stats.expirations == 1

    forever = ModelSpec(name="forever:1b", size=GiB)
    cfg.models.append(forever)
    sched.release(await sched.acquire(forever, num_ctx=4096, keep_alive=math.inf))
    [loaded] = sched.loaded()
    assert loaded.expires_at.year > 2200
    await sched.close()


# -- CLI ---------------------------------------------------------------------------------


def test_cli_flags_override_env_and_defaults() -> None:
    args = parse_args(
        [
            "--models",
            "llama3.2:1b@2GiB",
            "--parallel",
            "4",
            "--keep-alive",
            "-1",
            "--memory",
            "8GiB",
            "--output-tokens",
            "5:9",
            "--fail-next",
            "2",
        ]
    )
    cfg = build_config(args, {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_MAX_QUEUE": "7"})
    assert cfg.num_parallel == 4  # flag beats environment
    assert cfg.max_queue == 7
    assert cfg.port == 11434
    assert cfg.models[0].size == 2 * 1024**3
    assert cfg.default_keep_alive == float("inf")
    assert cfg.memory_budget == 8 * 1024**3
    assert cfg.output_tokens == (5, 9)
    assert cfg.faults.fail_next == 2
    instant = build_config(parse_args(["--instant"]), {})
    assert (instant.tokens_per_second, instant.load_time, instant.time_to_first_token) == (0, 0, 0)


def test_a_turn_with_tools_calls_the_one_that_fits_the_question() -> None:
    from usher.emulator.tools import choose_tool

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    add = {"type": "function", "function": {"name": "add", "description": "Add two numbers"}}
    asked = [{"role": "user", "content": "What's the weather in Paris?"}]
    chosen = choose_tool([add, weather], asked)
    assert chosen is not None and chosen.name == "get_weather"
    assert chosen.schema["properties"] == {"city": {"type": "string"}}
    numbers = choose_tool([weather, add], [{"role": "user", "content": "add two numbers"}])
    assert numbers is not None and numbers.name == "add"
    assert numbers.schema == {"type": "object", "properties": {}}  # no schema: no arguments
    answered = [*asked, {"role": "assistant", "content": ""}, {"role": "tool", "content": "sunny"}]
    assert choose_tool([weather], answered) is None  # the tool's answer is in: reply in text
    assert choose_tool([], asked) is None
    assert choose_tool(["not a tool", {"type": "function"}], asked) is None
