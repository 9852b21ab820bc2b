"""The Pool's settings (services/pool/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.pool.routing import Strategy
from services.pool.settings import (
    GIB,
    InstanceSpec,
    PoolSettings,
    is_local_url,
    load_pool_settings,
    normalize_base_url,
    parse_instances,
    parse_memory,
)
from usher.config import ConfigError
from usher.modelservers import auto_parallel
from usher.v1 import pool_pb2

BIG = 64 * GIB  # a machine with 64 GiB: "auto" resolves to 4 locally

EXAMPLE = """
strategy: affinity
health_interval_seconds: 2
idle_unload_seconds: 600
fallback_models: {"llama3.1:70b": ["llama3.1:8b", "llama3.2:3b"]}
external_models: {"llama3.2": "gpt-4o-mini"}
instances:
  - id: gpu-1
    base_url: http://10.0.0.5:11434
    kind: ollama
    weight: 2
    parallel: auto
    memory_budget: 24GiB
    max_loaded_models: 3
    preload: [llama3.2]
  - id: openai
    base_url: https://api.openai.com
    kind: openai
    external: true
    api_key_env: USHER_UPSTREAM_KEY_OPENAI
"""


def from_yaml(tmp_path: Path, text: str, **env: str) -> PoolSettings:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    return load_pool_settings({"USHER_POOL_CONFIG": str(path), **env}, total_memory_bytes=BIG)


def load(**env: str) -> PoolSettings:
    return load_pool_settings(env, total_memory_bytes=BIG)


# --- Small parsers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "parallel"),
    [(0, 1), (8 * GIB - 1, 1), (8 * GIB, 2), (16 * GIB - 1, 2), (16 * GIB, 4), (512 * GIB, 4)],
)
def test_auto_parallel(memory: int, parallel: int) -> None:
    assert auto_parallel(memory) == parallel


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * GIB),
        ("16GB", 16_000_000_000),
        ("16G", 16_000_000_000),
        ("24Gi", 24 * GIB),
        ("512 MiB", 512 << 20),
        ("1.5GiB", 3 * GIB // 2),
        ("4096", 4096),
        ("0", 0),
        ("2tb", 2_000_000_000_000),
        (12345, 12345),
        (1.5e9, 1_500_000_000),
    ],
)
def test_parse_memory(text: str | int | float, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "8XB", "-1", "GiB", "8 i", "", True, -5, None])
def test_parse_memory_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_memory(text)


@given(st.integers(0, 10**6), st.sampled_from(["", "K", "M", "G", "T"]), st.booleans())
def test_parse_memory_units(number: int, unit: str, binary: bool) -> None:
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    suffix = unit + ("iB" if binary and unit else "B")
    assert parse_memory(f"{number}{suffix}") == number * (1024 if binary else 1000) ** power


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("", None),
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        (":11434", "http://127.0.0.1:11434"),
        (":1234", "http://127.0.0.1:1234"),
        ("example.com", "http://example.com:11434"),
        ("example.com:5678", "http://example.com:5678"),
        ("http://example.com", "http://example.com"),  # the scheme's port, as Ollama does
        ("https://example.com", "https://example.com"),
        ("https://example.com:443", "https://example.com"),
        ("http://10.0.0.5:11434/", "http://10.0.0.5:11434"),
        ("https://proxy.example/ollama/", "https://proxy.example/ollama"),
        ("[::1]:11434", "http://[::1]:11434"),
        ("::1", "http://[::1]:11434"),
        ("[::]", "http://[::1]:11434"),
        ("HTTP://Example.com:80", "http://Example.com"),
    ],
)
def test_normalize_base_url_like_ollama_host(raw: str, url: str | None) -> None:
    if url is None:
        with pytest.raises(ValueError, match="URL"):
            normalize_base_url(raw)
    else:
        assert normalize_base_url(raw) == url
        assert normalize_base_url(url) == url  # canonical: normalizing again changes nothing


@pytest.mark.parametrize("raw", ["ftp://host", "unix:///tmp/sock", "host:port", "host:99999"])
def test_normalize_base_url_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|port"):
        normalize_base_url(raw)


def test_openai_kind_has_no_default_port() -> None:
    assert normalize_base_url("localhost", default_port=None) == "http://localhost"
    assert (
        InstanceSpec(id="v", base_url="localhost:8000", kind="openai").base_url
        == "http://localhost:8000"
    )


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://localhost:11434", True),
        ("http://127.0.0.1:11434", True),
        ("http://127.0.1.1:11434", True),
        ("http://[::1]:11434", True),
        ("http://10.0.0.5:11434", False),
        ("https://api.openai.com", False),
    ],
)
def test_is_local_url(url: str, local: bool) -> None:
    assert is_local_url(url) is local


# --- InstanceSpec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"weight": 0.0}, "weight"),
        ({"weight": -1.0}, "weight"),
        ({"kind": "tgi"}, "kind"),
        ({"roles": frozenset({"chat", "vision"})}, "roles"),
        ({"parallel": 0}, "parallel"),
        ({"memory_budget_bytes": -1}, "memory_budget"),
        ({"max_loaded_models": -1}, "max_loaded_models"),
        ({"preload": ("a",), "allowed_models": frozenset({"b"})}, "preload"),
        ({"preload": ("a", "a")}, "preload"),
        ({"id": "has space"}, "id"),
        ({"id": ""}, "id"),
        ({"api_key_env": "not a name"}, "api_key_env"),
    ],
)
def test_instance_spec_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"id": "gpu-1", **changes}
    with pytest.raises(ConfigError, match=rf"instance .*{field}"):
        InstanceSpec(**values)


def test_instance_spec_defaults_and_roles() -> None:
    spec = InstanceSpec(id="gpu-1")
    assert spec.base_url == "http://127.0.0.1:11434"
    assert spec.local
    assert spec.serves_role("chat")
    assert spec.serves_role("embedding")
    embedder = spec.replace(roles=frozenset({"embedding"}))
    assert not embedder.serves_role("chat")


def _spec(**values: Any) -> InstanceSpec:
    """A spec of these values, its preload and budget dropped where the Pool does not place
    models."""
    if values["kind"] != "ollama" or values["external"]:
        values["preload"], values["memory_budget_bytes"] = (), 0
    return InstanceSpec(**values)


specs = st.builds(
    _spec,
    id=st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
    base_url=st.sampled_from(
        ["http://10.0.0.5:11434", "https://api.openai.com", "http://localhost:8000/v1"]
    ),
    kind=st.sampled_from(["ollama", "openai"]),
    weight=st.floats(0.01, 100),
    roles=st.frozensets(st.sampled_from(["chat", "embedding"])),
    parallel=st.integers(1, 64),
    memory_budget_bytes=st.integers(0, 2**40),
    max_loaded_models=st.integers(0, 10),
    allowed_models=st.just(frozenset()),
    preload=st.lists(st.sampled_from(["llama3.2", "qwen2.5:7b", "mistral"]), unique=True).map(
        tuple
    ),
    external=st.booleans(),
    api_key_env=st.sampled_from(["", "USHER_UPSTREAM_KEY_OPENAI"]),
)


@given(specs)
def test_proto_round_trip(spec: InstanceSpec) -> None:
    message = spec.to_proto()
    again = pool_pb2.InstanceConfig.FromString(message.SerializeToString())
    assert InstanceSpec.from_proto(again) == spec


def test_proto_kinds() -> None:
    assert InstanceSpec(id="a").to_proto().kind == pool_pb2.INSTANCE_KIND_OLLAMA
    assert InstanceSpec(id="a", kind="openai").to_proto().kind == pool_pb2.INSTANCE_KIND_OPENAI


def test_from_proto_zeros_mean_defaults() -> None:
    local = InstanceSpec.from_proto(
        pool_pb2.InstanceConfig(id="a", base_url="localhost"), total_memory_bytes=8 * GIB
    )
    assert (local.kind, local.weight, local.parallel) == ("ollama", 1.0, 2)
    assert local.base_url == "http://localhost:11434"
    remote = InstanceSpec.from_proto(
        pool_pb2.InstanceConfig(id="b", base_url="http://10.0.0.5:11434"), total_memory_bytes=BIG
    )
    assert remote.parallel == 1


def test_from_proto_rejects_bad_config() -> None:
    with pytest.raises(ConfigError, match="weight"):
        InstanceSpec.from_proto(pool_pb2.InstanceConfig(id="a", base_url="h", weight=-2))
    with pytest.raises(ConfigError, match="base_url"):
        InstanceSpec.from_proto(pool_pb2.InstanceConfig(id="a", base_url="", parallel=1))
    with pytest.raises(ConfigError, match="parallel"):
        InstanceSpec.from_proto(pool_pb2.InstanceConfig(id="a", base_url="h", parallel=-1))


# --- The YAML file --------------------------------------------------------------------------------


def test_example_file(tmp_path: Path) -> None:
    s = from_yaml(tmp_path, EXAMPLE)
    gpu, openai = s.instances
    assert gpu == InstanceSpec(
        id="gpu-1",
        base_url="http://10.0.0.5:11434",
        kind="ollama",
        weight=2.0,
        parallel=1,  # remote: "auto" resolves to 1
        memory_budget_bytes=24 * GIB,
        max_loaded_models=3,
        preload=("llama3.2",),
    )
    assert openai.kind == "openai"
    assert openai.external
    assert openai.api_key_env == "USHER_UPSTREAM_KEY_OPENAI"
    assert openai.base_url == "https://api.openai.com"
    assert s.strategy is Strategy.AFFINITY
    assert s.health_interval_seconds == 2.0
    assert s.idle_unload_seconds == 600.0
    assert s.fallback_models == {"llama3.1:70b": ("llama3.1:8b", "llama3.2:3b")}
    assert s.external_models == {"llama3.2": "gpt-4o-mini"}
    assert s.listen == "127.0.0.1:50052"


def test_file_circuit_block_and_flat_keys(tmp_path: Path) -> None:
    s = from_yaml(
        tmp_path,
        "circuit: {failure_threshold: 3, open_seconds: 20}\ncircuit_failure_window_seconds: 60\n",
    )
    assert (s.circuit.failure_threshold, s.circuit.open_seconds) == (3, 20.0)
    assert s.circuit.failure_window_seconds == 60.0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    s = from_yaml(
        tmp_path,
        EXAMPLE,
        USHER_POOL_STRATEGY="least_connections",
        USHER_POOL_HEALTH_INTERVAL_SECONDS="5",
        USHER_POOL_LISTEN="0.0.0.0:6000",
        USHER_EXTERNAL_MODELS="llama3.2=gpt-4.1-mini",
    )
    assert s.strategy is Strategy.LEAST_CONNECTIONS
    assert s.health_interval_seconds == 5.0
    assert s.listen == "0.0.0.0:6000"
    assert s.external_models == {"llama3.2": "gpt-4.1-mini"}


def test_local_instance_auto_parallel_and_default_budget(tmp_path: Path) -> None:
    text = "instances:\n  - {id: here, base_url: 'localhost'}\n  - {id: there, base_url: h2}\n"
    s = from_yaml(tmp_path, text, MAX_MODEL_MEMORY_GB="24")
    here, there = s.instances
    assert (here.parallel, here.memory_budget_bytes) == (4, 24_000_000_000)
    assert (there.parallel, there.memory_budget_bytes) == (1, 0)
    s = from_yaml(tmp_path, "default_memory_budget: 8GiB\n" + text)
    assert s.instances[0].memory_budget_bytes == 8 * GIB


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("{id: a, base_url: 'ftp://x'}", "base_url"),
        ("{id: a, weight: 0}", "weight"),
        ("{id: a, kind: tgi}", "kind"),
        ("{id: a, roles: [chat, vision]}", "roles"),
        ("{id: a, memory_budget: lots}", "memory_budget"),
        ("{id: a, parallel: 0}", "parallel"),
        ("{id: a, parallel: many}", "parallel"),
        ("{id: a, preload: [x], allowed_models: [y]}", "preload"),
        ("{id: a, preload: [3.1]}", "preload"),
        ("{id: a, colour: red}", "colour"),
        ("{base_url: 'h'}", "id"),
    ],
)
def test_file_errors_name_instance_and_field(tmp_path: Path, entry: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as caught:
        from_yaml(tmp_path, f"instances:\n  - {entry}\n")
    assert "instances[0]" in str(caught.value)
    assert "pool.yaml" in str(caught.value)


def test_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate id 'a'"):
        from_yaml(tmp_path, "instances:\n  - {id: a}\n  - {id: a, base_url: h2}\n")


@pytest.mark.parametrize(
    "fallbacks",
    [
        '{"a": ["b"], "b": ["a"]}',
        '{"a": ["a"]}',
        '{"a": ["b", "c"], "c": ["d"], "d": ["a"]}',
    ],
)
def test_fallback_cycles_are_refused(tmp_path: Path, fallbacks: str) -> None:
    with pytest.raises(ConfigError, match="fallback_models: cycle"):
        from_yaml(tmp_path, f"fallback_models: {fallbacks}\n")


def test_fallback_chain_follows_fallbacks_of_fallbacks() -> None:
    s = PoolSettings(fallback_models={"70b": ("8b", "3b"), "8b": ("1b", "3b")})
    assert s.fallback_chain("70b") == ("8b", "1b", "3b")
    assert s.fallback_chain("other") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("healt_interval_seconds: 2\n", "unknown setting 'healt_interval_seconds'"),
        ("circuit: {threshold: 2}\n", "circuit: unknown setting 'threshold'"),
        ("health_interval_seconds: 0\n", "health_interval_seconds"),
        ("health_interval_seconds: soon\n", "health_interval_seconds"),
        ("strategy: random\n", "strategy"),
        ("log_level: loud\n", "log_level"),
        ("listen: nowhere\n", "listen"),
        ("scale_out_queue_length: -1\n", "scale_out_queue_length"),
        ("tokens: abc\n", "USHER_API_TOKENS"),
        ("- just a list\n", "mapping"),
        ("instances: {id: a}\n", "instances"),
        ("a: [unclosed\n", "YAML"),
    ],
)
def test_file_setting_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_yaml(tmp_path, text)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="USHER_POOL_CONFIG"):
        load(USHER_POOL_CONFIG="/nonexistent/pool.yaml")


def test_file_and_usher_instances_conflict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="USHER_INSTANCES"):
        from_yaml(tmp_path, EXAMPLE, USHER_INSTANCES="a=h1")


def test_file_instances_win_over_ollama_host(tmp_path: Path) -> None:
    s = from_yaml(tmp_path, EXAMPLE, OLLAMA_HOST="0.0.0.0")
    assert [i.id for i in s.instances] == ["gpu-1", "openai"]


# --- The environment -------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load()
    assert [(i.id, i.base_url, i.parallel) for i in s.instances] == [
        ("ollama", "http://127.0.0.1:11434", 4)
    ]
    assert s.strategy is Strategy.AFFINITY
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.tokens == {}
    assert (s.idle_unload_seconds, s.scale_out_queue_length) == (600.0, 8)
    assert s.circuit.failure_threshold == 5
    assert s.circuit.failure_window_seconds == 30.0
    assert s.circuit.open_seconds == 10.0


def test_auto_parallel_uses_system_memory_by_default() -> None:
    assert 1 <= load_pool_settings({}).instances[0].parallel <= 4


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:11434"),
        (":11434", "http://127.0.0.1:11434"),
        ("10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("https://ollama.example.com", "https://ollama.example.com"),
    ],
)
def test_ollama_host(host: str, url: str) -> None:
    (spec,) = load(OLLAMA_HOST=host).instances
    assert (spec.id, spec.base_url, spec.kind) == ("ollama", url, "ollama")


def test_ollama_host_bad_scheme() -> None:
    with pytest.raises(ConfigError, match=r"OLLAMA_HOST.*base_url"):
        load(OLLAMA_HOST="ftp://x")


def test_usher_instances_syntax() -> None:
    specs = parse_instances(
        "gpu1=http://10.0.0.5:11434,gpu2=http://h2:11434;kind=openai;weight=2,"
        " 10.0.0.9 ; memory=16GiB ; max_loaded=2 ; parallel=3 ; roles=chat ; preload=llama3.2,"
        "emb=localhost:9000;kind=openai;allowed=nomic-embed-text+bge-m3;roles=embedding;"
        "external=false;api_key_env=USHER_UPSTREAM_KEY_EMB",
        total_memory_bytes=BIG,
    )
    gpu1, gpu2, anon, emb = specs
    assert (gpu1.id, gpu1.base_url, gpu1.kind, gpu1.weight) == (
        "gpu1",
        "http://10.0.0.5:11434",
        "ollama",
        1.0,
    )
    assert (gpu2.kind, gpu2.weight, gpu2.parallel) == ("openai", 2.0, 1)
    assert (anon.id, anon.base_url) == ("10.0.0.9:11434", "http://10.0.0.9:11434")
    assert (anon.memory_budget_bytes, anon.max_loaded_models, anon.parallel) == (16 * GIB, 2, 3)
    assert anon.roles == frozenset({"chat"}) and anon.preload == ("llama3.2",)
    assert emb.base_url == "http://localhost:9000"
    assert emb.parallel == 4  # local, auto
    assert emb.allowed_models == frozenset({"nomic-embed-text", "bge-m3"})
    assert emb.api_key_env == "USHER_UPSTREAM_KEY_EMB"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("a=ftp://x", "base_url"),
        ("a=http://h:8000;kind=openai;preload=m", "preload"),
        ("a=http://h:11434;external=true;preload=m", "preload"),
        ("a=http://h:8000;kind=openai;memory=8GiB", "memory_budget"),
        ("a=h;weight=0", "weight"),
        ("a=h;weight=heavy", "weight"),
        ("a=h;kind=foo", "kind"),
        ("a=h;roles=chat+img", "roles"),
        ("a=h;memory=lots", "memory_budget"),
        ("a=h;parallel=0", "parallel"),
        ("a=h;allowed=m1;preload=m2", "preload"),
        ("a=h;colour=red", "colour"),
        ("a=h;external=maybe", "external"),
        ("a=h;weight", "key=value"),
        ("a=h,a=h2", "duplicate id"),
    ],
)
def test_usher_instances_errors_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as caught:
        load(USHER_INSTANCES=spec)
    assert "'a'" in str(caught.value) or "entry" in str(caught.value)


def test_environment_settings() -> None:
    s = load(
        USHER_INSTANCES="a=h1",
        USHER_POOL_STRATEGY="wrr",
        REDIS_URL="redis://r:6379/1",
        USHER_API_TOKENS="t0k3n=alice@acme:admin",
        USHER_LOG_LEVEL="DEBUG",
        MODEL_POOL_AUTO_UNLOAD_MINUTES="5",
        USHER_POOL_SCALE_OUT_QUEUE_LENGTH="4",
        USHER_CIRCUIT_FAILURE_THRESHOLD="2",
        USHER_FALLBACK_MODELS="llama3.1:70b=llama3.1:8b+llama3.2:3b,qwen2.5:32b=qwen2.5:7b",
    )
    assert s.strategy is Strategy.WEIGHTED_ROUND_ROBIN
    assert s.redis_url == "redis://r:6379/1"
    assert s.tokens["t0k3n"].tenant == "acme/alice"
    assert s.tokens["t0k3n"].is_admin
    assert s.log_level == "debug"
    assert s.idle_unload_seconds == 300.0
    assert s.scale_out_queue_length == 4
    assert s.circuit_failure_threshold == 2
    assert s.fallback_models == {
        "llama3.1:70b": ("llama3.1:8b", "llama3.2:3b"),
        "qwen2.5:32b": ("qwen2.5:7b",),
    }
    assert load(USHER_REDIS_URL="redis://a", REDIS_URL="redis://b").redis_url == "redis://a"
    seconds = load(MODEL_POOL_AUTO_UNLOAD_MINUTES="5", USHER_POOL_IDLE_UNLOAD_SECONDS="42")
    assert seconds.idle_unload_seconds == 42.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"USHER_POOL_STRATEGY": "random"}, "USHER_POOL_STRATEGY"),
        ({"USHER_POOL_HEALTH_INTERVAL_SECONDS": "soon"}, "USHER_POOL_HEALTH_INTERVAL_SECONDS"),
        ({"USHER_CIRCUIT_OPEN_SECONDS": "0"}, "USHER_CIRCUIT_OPEN_SECONDS=.0."),
        ({"USHER_FALLBACK_MODELS": "a=b,b=a"}, "cycle a -> b -> a"),
        ({"USHER_FALLBACK_MODELS": "justamodel"}, "USHER_FALLBACK_MODELS"),
        ({"USHER_API_TOKENS": "nonsense"}, "USHER_API_TOKENS"),
        ({"MAX_MODEL_MEMORY_GB": "lots"}, "MAX_MODEL_MEMORY_GB"),
    ],
)
def test_environment_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**env)


def test_max_model_memory_accepts_units() -> None:
    assert load(MAX_MODEL_MEMORY_GB="24GiB").instances[0].memory_budget_bytes == 24 * GIB
    assert load(MAX_MODEL_MEMORY_GB="1.5").instances[0].memory_budget_bytes == 1_500_000_000


def test_settings_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match="duplicate id"):
        PoolSettings(instances=(InstanceSpec(id="a"), InstanceSpec(id="a", base_url="h2")))
    with pytest.raises(ConfigError, match="unhealthy_after_failures"):
        PoolSettings(unhealthy_after_failures=0)
    assert PoolSettings().instance("ollama") is not None
    assert PoolSettings().instance("nope") is None


def test_keep_alive_outlives_usher_s_unload_and_an_operator_s_hold() -> None:
    settings = PoolSettings(idle_unload_seconds=600, placement_interval_seconds=5)
    spec = InstanceSpec(id="a", preload=("phi3",))
    assert settings.keep_alive_for(spec, "llama3.2") == 610
    assert settings.keep_alive_for(spec, "llama3.2", held_for=86_400) == 86_400
    assert settings.keep_alive_for(spec, "llama3.2", held_for=30) == 610  # at least
    assert settings.keep_alive_for(spec, "llama3.2", held_for=-1) == -1  # until unloaded
    assert settings.keep_alive_for(spec, "phi3") == -1
    assert settings.replace(idle_unload_seconds=0).keep_alive_for(spec, "llama3.2") == -1


def test_a_budget_stored_on_a_server_the_pool_does_not_place_on_is_dropped() -> None:
    """Registrations stored before budgets were the placed instances' alone (a local
    OpenAI-compatible server got the default one) still load, without it."""
    stored = pool_pb2.InstanceConfig(
        id="vllm", base_url="http://localhost:8000", kind=pool_pb2.INSTANCE_KIND_OPENAI
    )
    stored.memory_budget_bytes = 8 * GIB
    assert InstanceSpec.from_proto(stored).memory_budget_bytes == 0
