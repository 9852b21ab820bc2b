"""Which model servers ``usher up`` runs: what it detects at an address (pure verdicts and
real servers), and one clear line when nothing answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import pytest

from clients.up import add_detected_kinds, fleet_source, try_it
from tests.up.conftest import REPO, serving, up_env
from usher.emulator import EmulatorProcess
from usher.modelservers import classify
from usher.testing.llamacpp import running_llama_server
from usher.testing.processes import free_port

URL = "http://127.0.0.1:9"


def answer(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body)


def test_ollama_is_known_by_its_tags_even_though_it_also_speaks_openai() -> None:
    found = classify(
        URL,
        answer(200, {"models": [{"name": "llama3.2:1b"}]}),
        answer(200, {"data": [{"id": "llama3.2:1b", "owned_by": "library"}]}),
        answer(200, {"version": "0.12.0"}),
    )
    assert (found.kind, found.models, found.server) == ("ollama", ("llama3.2:1b",), "Ollama 0.12.0")


@pytest.mark.parametrize(
    ("owner", "server"),
    [
        ("vllm", "vLLM"),
        ("llamacpp", "llama.cpp server"),
        ("someone", "an OpenAI-compatible server"),
    ],
)
def test_openai_compatible_servers_are_named_by_their_owner(owner: str, server: str) -> None:
    found = classify(URL, answer(404, {}), answer(200, {"data": [{"id": "m", "owned_by": owner}]}))
    assert (found.kind, found.models, found.server) == ("openai", ("m",), server)


def test_nothing_usable_names_the_url_and_what_was_tried() -> None:
    found = classify(
        URL, httpx.ConnectError("connection refused"), httpx.ConnectError("connection refused")
    )
    assert found.kind is None
    line = found.describe()
    assert URL in line and "/api/tags" in line and "/v1/models" in line and "refused" in line


def test_detected_kinds_are_added_only_where_none_was_given() -> None:
    line = "a=http://h1:8000, b=http://h2:11434;weight=2 ,c=http://h3:8000;kind=ollama"
    assert add_detected_kinds(line, ["openai", None, "openai"]) == (
        "a=http://h1:8000;kind=openai,b=http://h2:11434;weight=2,c=http://h3:8000;kind=ollama"
    )


def test_the_fleet_comes_from_the_pools_own_order_of_settings() -> None:
    assert fleet_source({}) == "emulator"
    assert fleet_source({"OLLAMA_HOST": "h", "USHER_INSTANCES": "x"}) == "USHER_INSTANCES"
    assert fleet_source({"USHER_POOL_CONFIG": "f.yaml", "OLLAMA_HOST": "h"}) == "USHER_POOL_CONFIG"


def test_try_it_uses_the_gateway_and_tells_the_cli_where_services_are() -> None:
    text = try_it("http://127.0.0.1:8080", "m:1b", admin_token="t", cli_env="USHER_POOL_ADDRESS=x ")
    assert "OLLAMA_HOST=127.0.0.1:8080 ollama run m:1b" in text
    assert "USHER_POOL_ADDRESS=x .venv/bin/usher chat m:1b" in text
    assert "/ui" in text


def test_nothing_answering_stops_at_once_with_one_line_naming_the_url(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "up"],
        env=up_env(tmp_path, USHER_INSTANCES=f"gpu={dead}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert f"nothing usable answered at http://{dead}" in done.stdout
    assert "GET /api/tags (Ollama) and GET /v1/models (OpenAI-compatible)" in done.stdout


@pytest.mark.slow
def test_usher_instances_on_a_real_ollama_api_is_detected_and_served(tmp_path: Path) -> None:
    with EmulatorProcess(["--models", "qwen2.5:0.5b", "--tokens-per-second", "400"]) as server:
        env = up_env(tmp_path, USHER_INSTANCES=f"desk={server.url}")
        with serving([], env, ready_timeout=60) as running:
            assert f"{server.url}: Ollama" in running.output
            client = ollama.Client(host=running.gateway.removeprefix("http://"))
            assert client.chat(
                "qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}]
            ).message.content


@pytest.mark.slow
def test_ollama_host_naming_a_llama_cpp_server_is_detected_as_openai_compatible(
    tmp_path: Path,
) -> None:
    # The bug this guards: OLLAMA_HOST at a llama.cpp server used to stop `make up` with
    # "serves no models", since that server has no /api/tags.
    with running_llama_server(
        log_dir=tmp_path, alias="smollm2", extra_args=("--interrupt_requests", "False")
    ) as llama:
        host = llama.url.removeprefix("http://")
        with serving([], up_env(tmp_path, OLLAMA_HOST=host), ready_timeout=60) as running:
            assert "llama-cpp-python server (smollm2)" in running.output
            client = ollama.Client(host=running.gateway.removeprefix("http://"))
            reply = client.chat(
                "smollm2", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 6}
            )
            assert reply.message.content
