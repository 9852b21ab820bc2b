"""Command line: ``python -m usher.emulator``.

Prints one URL per instance on stdout (one line each, flushed) once listening,
then serves until SIGINT/SIGTERM. Settings come, lowest precedence first, from
built-in defaults, ``OLLAMA_*`` environment variables (NUM_PARALLEL, MAX_QUEUE,
MAX_LOADED_MODELS, KEEP_ALIVE, CONTEXT_LENGTH), ``--config FILE`` (JSON or
YAML, the shape of ``EmulatorConfig.to_dict()``) and finally the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usher import eventloop
from usher.emulator.config import EmulatorConfig
from usher.emulator.server import CrashMode, EmulatorServer

__all__ = ["build_config", "main", "parse_args"]

_ENV = {
    "OLLAMA_NUM_PARALLEL": ("num_parallel", int),
    "OLLAMA_MAX_QUEUE": ("max_queue", int),
    "OLLAMA_MAX_LOADED_MODELS": ("max_loaded_models", int),
    "OLLAMA_KEEP_ALIVE": ("default_keep_alive", str),
    "OLLAMA_CONTEXT_LENGTH": ("default_num_ctx", int),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m usher.emulator",
        description="Emulate one or more Ollama servers (API, scheduler, faults).",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        help="port, 0 = any free port (default 11434); "
        "with --fleet, the first of consecutive ports",
    )
    p.add_argument(
        "--fleet", type=int, default=1, metavar="N", help="run N instances in this process"
    )
    p.add_argument("--config", type=Path, help="JSON/YAML file with EmulatorConfig fields")
    p.add_argument("--models", help="comma list of name[@size], e.g. llama3.2:1b,big:7b@4.7GB")
    p.add_argument("--tokens-per-second", type=float, help="decode speed; 0 = no pacing")
    p.add_argument(
        "--instant",
        action="store_true",
        help="zero-delay mode: no load time, no prompt time, no token pacing",
    )
    p.add_argument(
        "--ttft",
        type=float,
        dest="time_to_first_token",
        help="prompt evaluation time before the first token, seconds",
    )
    p.add_argument("--load-time", type=float, help="model load time, seconds")
    p.add_argument(
        "--parallel",
        type=int,
        dest="num_parallel",
        help="slots per loaded model (OLLAMA_NUM_PARALLEL)",
    )
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (OLLAMA_MAX_QUEUE)")
    p.add_argument(
        "--max-queue-scope",
        choices=("all", "load"),
        help="count all waiting requests (default) or only those needing a load",
    )
    p.add_argument(
        "--max-loaded-models", type=int, help="OLLAMA_MAX_LOADED_MODELS (0 = automatic, 3)"
    )
    p.add_argument(
        "--memory",
        dest="memory_budget",
        help="memory budget for loaded models, e.g. 16GiB (0 = unlimited)",
    )
    p.add_argument(
        "--keep-alive",
        dest="default_keep_alive",
        help="default keep-alive, e.g. 5m, 30s, -1 (OLLAMA_KEEP_ALIVE)",
    )
    p.add_argument(
        "--num-ctx",
        type=int,
        dest="default_num_ctx",
        help="default context length when requests set none",
    )
    p.add_argument(
        "--output-tokens",
        metavar="LO:HI",
        help="natural response length range in tokens (default 16:64)",
    )
    p.add_argument("--seed", type=int, help="salt for the deterministic text")
    p.add_argument("--embedding-dim", type=int, help="override every model's embedding size")
    p.add_argument("--version", dest="version", help="version reported by /api/version")
    p.add_argument(
        "--cpu-only", action="store_true", default=None, help="report size_vram 0 in /api/ps"
    )
    p.add_argument("--fail-next", type=int, help="fault: next N inference requests fail (500)")
    p.add_argument(
        "--error-after-tokens",
        type=int,
        help="fault: streams end with an error line after N tokens",
    )
    p.add_argument(
        "--hang",
        action="store_true",
        default=None,
        help="fault: the API never answers (admin still does)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return p.parse_args(argv)


def _load_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only needed for YAML configs

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of EmulatorConfig fields")
    return data


def build_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> EmulatorConfig:
    """Merge defaults, environment, config file and flags into one config."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {"port": 11434}
    for var, (key, kind) in _ENV.items():
        if env.get(var):
            data[key] = kind(env[var])
    if args.config is not None:
        data.update(_load_file(args.config))
    faults: dict[str, Any] = dict(data.pop("faults", {}) or {})
    for key in (
        "host",
        "port",
        "models",
        "tokens_per_second",
        "time_to_first_token",
        "load_time",
        "num_parallel",
        "max_queue",
        "max_queue_scope",
        "max_loaded_models",
        "memory_budget",
        "default_keep_alive",
        "default_num_ctx",
        "seed",
        "embedding_dim",
        "version",
        "cpu_only",
    ):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.output_tokens:
        lo, _, hi = args.output_tokens.partition(":")
        data["output_tokens"] = (int(lo), int(hi or lo))
    if args.fail_next is not None:
        faults["fail_next"] = args.fail_next
    if args.error_after_tokens is not None:
        faults["error_after_tokens"] = args.error_after_tokens
    if args.hang:
        faults["hang"] = True
    if faults:
        data["faults"] = faults
    config = EmulatorConfig.from_dict(data)
    if args.instant:
        config.make_instant()
    return config


async def _serve(config: EmulatorConfig, count: int, access_log: bool) -> None:
    # One instance owns the process, so an injected crash exits it; in a fleet a
    # crash only takes its own instance down.
    mode: CrashMode = "exit" if count == 1 else "close"
    servers = []
    for i in range(count):
        cfg = copy.deepcopy(config)
        if config.port and count > 1:
            cfg.port = config.port + i
        servers.append(EmulatorServer(cfg, crash_mode=mode, access_log=access_log))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        for server in servers:
            await server.start()
            print(server.url, flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = build_config(args)
    except (ValueError, TypeError) as exc:
        print(f"usher.emulator: {exc}", file=sys.stderr)
        return 2
    if args.fleet < 1:
        print("usher.emulator: --fleet must be at least 1", file=sys.stderr)
        return 2
    eventloop.run(_serve(config, args.fleet, args.access_log))
    return 0
