"""The ``usher`` command: chat with a model through the queue, watch requests, see the
queues and the fleet live, and run the operator's admin calls.

```
usher chat llama3.2:1b "Why is the sky blue?"     # live place in the queue, then the answer
usher submit llama3.2:1b "Summarise this" && usher watch ID
usher top                                         # live queues (and fleet, with --pool)
usher admin queue-config llama3.2:1b --max-queue-size 50 --queue-timeout 5m
```

Addresses and token come from ``--scheduler``, ``--notifier``, ``--pool``, ``--token`` or
``USHER_SCHEDULER_ADDRESS``, ``USHER_NOTIFIER_ADDRESS``, ``USHER_POOL_ADDRESS``,
``USHER_TOKEN``. Exit codes: 0 ok, 1 other failure, 2 bad input, 3 not found / not allowed,
4 unavailable or busy (retry later), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live
from rich.status import Status
from rich.table import Table

# Submodules, not the package: an editable install may expose ``clients`` as a namespace.
from clients.aio import AsyncAdmin, AsyncUsherClient, SubmitOptions
from clients.dashboard import render_dashboard
from clients.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UsherError,
)
from clients.retry import NO_RETRY, RetryEvent, RetryPolicy
from clients.types import Badge, Request, RequestState, Update, UpdateKind
from usher.v1 import pool_pb2

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "exit_code_for", "main", "parse_duration"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_DENIED = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130

_T = TypeVar("_T")
_PROCESSING = "Your request is now being processed…"
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from "250ms", "30s", "5m", "1.5h" or a bare number of seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_keep_alive(text: str) -> float:
    """A duration, or "forever" (-1: until unloaded by hand)."""
    return -1.0 if text.strip().lower() == "forever" else parse_duration(text)


def exit_code_for(error: UsherError) -> int:
    if isinstance(error, InvalidArgument):
        return EXIT_BAD_INPUT
    if isinstance(error, NotFound | PermissionDenied | Unauthenticated):
        return EXIT_DENIED
    if isinstance(error, Unavailable | ResourceExhausted | DeadlineExceeded):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


class _Out:
    """Where things go: tokens and results to stdout, status and notes to stderr."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.err = Console(file=stderr or sys.stderr, highlight=False, soft_wrap=True)
        wide = None if self.stdout.isatty() else 160
        self.out = Console(file=self.stdout, highlight=False, width=wide)

    @property
    def interactive(self) -> bool:
        return self.stdout.isatty()

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def note(self, text: str, style: str = "") -> None:
        self.err.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.err.print(f"usher: {text}", markup=False, highlight=False, style="red")


class _StatusLine:
    """A status line redrawn in place on a terminal; plain lines (on change) elsewhere."""

    def __init__(self, out: _Out) -> None:
        self._out = out
        self._live = out.err.is_terminal
        self._status: Status | None = None
        self._last = ""

    def show(self, text: str) -> None:
        if not text or text == self._last:
            return
        self._last = text
        if not self._live:
            self._out.note(text)
        elif self._status is None:
            self._status = Status(text, console=self._out.err, spinner="dots")
            self._status.start()
        else:
            self._status.update(text)

    def hide(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        self._last = ""


# -- client and options -----------------------------------------------------------------


def _client(args: argparse.Namespace, out: _Out) -> AsyncUsherClient:
    ca = getattr(args, "ca", None)
    retry_for = getattr(args, "retry_for", None)

    def announce(event: RetryEvent) -> None:
        if event.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            out.note(f"{event.error.describe()} (retrying in {event.delay:.0f}s…)", "yellow")
        elif event.attempt in (1, 5, 10):
            out.note(f"{event.method}: {event.error.message}; retrying…", "yellow")

    retry = RetryPolicy(on_retry=announce)
    if retry_for is not None:
        retry = RetryPolicy(on_retry=announce, max_total_wait=retry_for)
    return AsyncUsherClient(
        getattr(args, "scheduler", None),
        getattr(args, "notifier", None),
        pool_address=getattr(args, "pool", None),
        token=getattr(args, "token", None),
        root_certificates=Path(ca).read_bytes() if ca else None,
        timeout=getattr(args, "timeout", 10.0),
        retry=retry,
    )


def _submit_options(args: argparse.Namespace) -> SubmitOptions:
    options: SubmitOptions = {}
    if args.system:
        options["system"] = args.system
    if args.priority:
        options["priority"] = args.priority
    if args.fallback:
        options["fallback"] = args.fallback
    if args.queue_timeout is not None:
        options["queue_timeout"] = args.queue_timeout
    if args.deadline is not None:
        options["deadline"] = args.deadline
    if args.max_tokens is not None:
        options["num_predict"] = args.max_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    if args.format:
        options["format"] = args.format
    if args.label:
        options["labels"] = dict(_key_value(item) for item in args.label)
    if args.idempotency_key:
        options["idempotency_key"] = args.idempotency_key
    return options


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidArgument(f"label {text!r} is not key=value")
    return key, value


def _prompt(args: argparse.Namespace) -> str:
    prompt: str = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    return prompt


def _as_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


# -- following one request ----------------------------------------------------------------


class _Follower:
    """Shows a request's journey: status line while queued, tokens while running, the
    ready line at the end."""

    def __init__(self, out: _Out, *, stream: bool = True) -> None:
        self.out = out
        self.status = _StatusLine(out)
        self.stream = stream
        self.request_id = ""
        self.started = False
        self.text_open = False  # tokens written without a final newline yet
        self.final: Request | None = None

    def begin(self, request: Request) -> None:
        self.request_id = request.id
        self.status.show(request.status_message())

    def _start_output(self) -> None:
        if not self.started:
            self.status.hide()
            self.out.note(_PROCESSING, "cyan")
            self.started = True

    def _close_text(self) -> None:
        if self.text_open:
            self.out.write("\n")
            self.text_open = False

    def apply(self, update: Update) -> None:
        request = update.request
        self.request_id = request.id
        if update.kind == UpdateKind.REQUEUED:
            self._close_text()
            if self.started:
                self.out.note(
                    "The model server stopped mid-answer; your request is back in the queue "
                    "and will start over.",
                    "yellow",
                )
            self.started = False
        if update.is_terminal:
            self.final = request
            self.status.hide()
            if update.text_delta and self.stream:
                self._start_output()
                self.out.write(update.text_delta)
                self.text_open = True
            self._close_text()
            return
        if update.text_delta and self.stream:
            self._start_output()
            self.out.write(update.text_delta)
            self.text_open = not update.text_delta.endswith("\n")
            return
        if request.state == RequestState.RUNNING:
            if self.stream:
                self._start_output()
            else:
                self.status.show(update.message or _PROCESSING)
            return
        if request.state == RequestState.QUEUED:
            self.status.show(update.message or request.status_message())

    def interrupted(self) -> None:
        self.status.hide()
        self._close_text()

    def finish(self, as_json: bool) -> int:
        final = self.final
        if final is None:
            return EXIT_FAILED
        if as_json:
            self.out.write(_as_json(final.raw) + "\n")
        if final.state == RequestState.COMPLETED:
            if not self.stream and not as_json:
                self.out.write(final.text + ("" if final.text.endswith("\n") else "\n"))
            self.out.note(final.status_message(), "bold green")
            return EXIT_OK
        self.out.error(final.status_message() or f"request {final.id} {final.state.label}")
        return EXIT_FAILED


async def _follow(
    client: AsyncUsherClient, follower: _Follower, request_id: str, last_event_id: str = ""
) -> None:
    async for update in client.watch(request_id, last_event_id):
        follower.apply(update)


async def _interruptible(work: Awaitable[_T]) -> tuple[bool, _T | None]:
    """Run ``work``; Ctrl-C cancels it. (True, result), or (False, None) after Ctrl-C."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return True, await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return False, None
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


async def cmd_chat(args: argparse.Namespace, out: _Out) -> int:
    client = _client(args, out)
    messages = [("user", _prompt(args))]
    options = _submit_options(args)
    # One idempotency key for the whole run: a Ctrl-C during Submit can still find (and
    # cancel) the request if the server had accepted it.
    options.setdefault("idempotency_key", uuid.uuid4().hex)
    follower = _Follower(out, stream=not args.json)

    async def run() -> None:
        submission = await client.submit(args.model, messages=messages, **options)
        follower.begin(submission.request)
        await _follow(client, follower, submission.id)

    async with client:
        follower.status.show("Submitting your request…")
        finished, _ = await _interruptible(run())
        if finished:
            return follower.finish(args.json)
        follower.interrupted()
        request_id = follower.request_id
        try:
            if not request_id:  # interrupted during Submit: find it by its idempotency key
                client.retry = NO_RETRY
                request_id = (await client.submit(args.model, messages=messages, **options)).id
            after = await client.cancel(request_id, "cancelled from the usher command line")
        except UsherError as error:
            out.error(f"could not cancel {request_id or 'the request'}: {error.describe()}")
            return EXIT_INTERRUPTED
        if after.state == RequestState.RUNNING:
            # A running request stops when its dispatcher next checks in (within seconds).
            out.note(f"usher: cancelling request {request_id}", "yellow")
        else:
            out.note(f"usher: cancelled request {request_id}", "yellow")
        return EXIT_INTERRUPTED


async def cmd_submit(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        prompt = _prompt(args)
        options = _submit_options(args)
        if args.generate:
            submission = await client.submit(args.model, prompt, **options)
        else:
            submission = await client.submit(args.model, messages=[("user", prompt)], **options)
    if args.json:
        out.write(_as_json(submission.raw) + "\n")
    else:
        out.write(submission.id + "\n")
        note = submission.request.status_message()
        if submission.replayed:
            note += " (an earlier submission with this idempotency key)"
        elif submission.deduplicated:
            note += " (sharing an identical request already in the queue)"
        out.note(note)
    return EXIT_OK


async def cmd_watch(args: argparse.Namespace, out: _Out) -> int:
    follower = _Follower(out, stream=not args.json)
    async with _client(args, out) as client:
        finished, _ = await _interruptible(
            _follow(client, follower, args.id, args.last_event_id or "")
        )
    if not finished:
        follower.interrupted()
        out.note(f"usher: stopped watching {args.id} (it goes on; `usher cancel {args.id}`)")
        return EXIT_INTERRUPTED
    return follower.finish(args.json)


async def cmd_get(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        request = await client.get(args.id)
    if args.json:
        out.write(_as_json(request.raw) + "\n")
    else:
        out.out.print(_requests_table([request]))
        if request.text:
            out.write(request.text + "\n")
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        request = await client.cancel(args.id, args.reason or "")
    out.note(
        f"{request.id}: cancel requested; it stops shortly"
        if request.state == RequestState.RUNNING
        else f"{request.id}: {request.state.label}"
    )
    return EXIT_OK


async def cmd_switch(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        request = await client.switch_provider(args.id)
    out.note(f"{request.id}: moved to the external provider ({request.status_message()})")
    return EXIT_OK


def _requests_table(requests: Sequence[Request]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("id", "model", "state", "created", "status"):
        table.add_column(column)
    for request in requests:
        created = (
            request.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            if (request.created_at)
            else "-"
        )
        table.add_row(
            request.id, request.model, request.state.label, created, request.status_message()
        )
    return table


async def cmd_list(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        requests = await client.list(model=args.model or "", states=args.state, limit=args.limit)
    if args.json:
        for request in requests:
            out.write(_as_json(request.raw) + "\n")
    else:
        out.out.print(_requests_table(requests))
    return EXIT_OK


# -- top ----------------------------------------------------------------------------------


async def cmd_top(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        badges: tuple[Badge, ...] = ()
        with_pool = bool(client.pool_address)
        instances: tuple[pool_pb2.InstanceStatus, ...] | None = () if with_pool else None
        stats: tuple[pool_pb2.ModelStats, ...] | None = () if with_pool else None
        problems: list[str] = []

        async def poll_pool() -> None:
            nonlocal instances, stats
            if not with_pool:
                return
            try:
                instances = await client.list_instances()
                stats = await client.model_stats(args.models)
                problems[:] = [p for p in problems if not p.startswith("pool:")]
            except UsherError as error:
                problems[:] = [p for p in problems if not p.startswith("pool:")]
                problems.append(f"pool: {error.describe()}")

        def frame() -> Any:
            return render_dashboard(badges, instances, stats, problems=problems)

        badge_stream = client.queues(args.models)
        if args.once:
            async with asyncio.timeout(getattr(args, "timeout", None) or 10.0):
                badges = await anext(badge_stream)
            await badge_stream.aclose()
            await poll_pool()
            out.out.print(frame())
            return EXIT_OK

        async def follow() -> None:
            nonlocal badges
            try:
                async for update in badge_stream:
                    badges = update
                    problems[:] = [p for p in problems if not p.startswith("queues:")]
            except UsherError as error:
                problems.append(f"queues: {error.describe()}")

        async def refresh(live: Live) -> None:
            while True:
                await poll_pool()
                live.update(frame(), refresh=True)
                await asyncio.sleep(args.interval)

        follower = asyncio.ensure_future(follow())
        try:
            with Live(frame(), console=out.out, auto_refresh=False, screen=False) as live:
                await _interruptible(refresh(live))
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        return EXIT_OK


# -- admin --------------------------------------------------------------------------------


def _print_message(out: _Out, message: Message, as_json: bool) -> None:
    if as_json:
        out.write(_as_json(message) + "\n")
        return
    text = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)
    out.out.print_json(text)


def _print_instance(out: _Out, instance: pool_pb2.InstanceStatus, as_json: bool) -> None:
    if as_json:
        out.write(_as_json(instance) + "\n")
    else:
        from clients.dashboard import render_instances

        out.out.print(render_instances([instance]))


def _register(admin: AsyncAdmin, args: argparse.Namespace) -> Awaitable[pool_pb2.InstanceStatus]:
    return admin.register_instance(
        args.id,
        args.url,
        kind=args.kind,
        weight=args.weight,
        parallel=args.parallel,
        roles=args.role or (),
        memory_budget_bytes=args.memory,
        max_loaded_models=args.max_loaded_models,
        preload=args.preload or (),
        allowed_models=args.allowed_model or (),
        external=args.external,
        api_key_env=args.api_key_env or "",
    )


#: Admin actions on one instance, each answered with the instance's status.
_INSTANCE_ACTIONS: dict[
    str, Callable[[AsyncAdmin, argparse.Namespace], Awaitable[pool_pb2.InstanceStatus]]
] = {
    "drain": lambda admin, a: admin.drain_instance(a.id, not a.undo),
    "weight": lambda admin, a: admin.set_instance_weight(a.id, a.weight),
    "reset-circuit": lambda admin, a: admin.reset_circuit(a.id, a.model or ""),
    "load": lambda admin, a: admin.load_model(a.id, a.model, keep_alive=a.keep_alive),
    "unload": lambda admin, a: admin.unload_model(a.id, a.model),
    "register": _register,
}


#: The Scheduler's admin actions (the rest are the Pool's: instances and models).
_QUEUE_ACTIONS = (
    "queue-config",
    "queue-stats",
    "tenant-weight",
    "dead-letters",
    "retry-dead-letter",
)


async def cmd_admin(args: argparse.Namespace, out: _Out) -> int:
    async with _client(args, out) as client:
        action: str = args.admin_command
        if action in _QUEUE_ACTIONS:
            await _queue_admin(client.admin, action, args, out)
        else:
            await _fleet_admin(client, action, args, out)
    return EXIT_OK


async def _queue_admin(admin: AsyncAdmin, action: str, args: argparse.Namespace, out: _Out) -> None:
    """Queues, tenants and dead letters (the Scheduler)."""
    if action == "queue-config":
        config = await admin.update_queue_config(
            args.model,
            max_queue_size=args.max_queue_size,
            queue_timeout=args.queue_timeout,
            max_attempts=args.max_attempts,
            lease_duration=args.lease,
            parallel=args.parallel,
        )
        _print_message(out, config, args.json)
    elif action == "queue-stats":
        all_stats = await admin.queue_stats(args.models)
        if args.json:
            for stat in all_stats:
                out.write(_as_json(stat) + "\n")
        else:
            out.out.print(_queue_stats_table(all_stats))
    elif action == "tenant-weight":
        organization, user, weight = _tenant_weight_args(args.values)
        response = await admin.set_tenant_weight(organization, weight, user)
        _print_message(out, response, args.json)
    elif action == "dead-letters":
        dead = await admin.dead_letters(args.model, page_size=args.limit)
        if args.json:
            for request in dead:
                out.write(_as_json(request.raw) + "\n")
        else:
            out.out.print(_requests_table(dead))
    elif action == "retry-dead-letter":
        request = await admin.retry_dead_letter(args.request_id)
        _print_message(out, request.raw, args.json)


async def _fleet_admin(
    client: AsyncUsherClient, action: str, args: argparse.Namespace, out: _Out
) -> None:
    """Instances and their models (the Pool)."""
    if action == "instances":
        instances = await client.list_instances()
        if args.json:
            for instance in instances:
                out.write(_as_json(instance) + "\n")
        else:
            from clients.dashboard import render_instances

            out.out.print(render_instances(instances))
    elif action in _INSTANCE_ACTIONS:
        instance = await _INSTANCE_ACTIONS[action](client.admin, args)
        _print_instance(out, instance, args.json)
    elif action == "deregister":
        await client.admin.deregister_instance(args.id)
        out.note(f"{args.id}: deregistered")
    elif action == "pull":
        await _pull(client.admin, args, out)


async def _pull(admin: AsyncAdmin, args: argparse.Namespace, out: _Out) -> None:
    """A model onto one or every local instance, one progress line per step."""
    async for step in admin.pull_model(args.model, args.instance or ""):
        if args.json:
            out.write(_as_json(step) + "\n")
            continue
        done = f" {step.completed * 100 // step.total}%" if step.total else ""
        out.write(f"{step.instance}: {step.status}{done}\n")


def _tenant_weight_args(values: Sequence[str]) -> tuple[str, str, float]:
    if len(values) not in (2, 3):
        raise InvalidArgument("tenant-weight takes ORG [USER] WEIGHT")
    organization, user = values[0], values[1] if len(values) == 3 else ""
    try:
        weight = float(values[-1])
    except ValueError:
        raise InvalidArgument(f"weight {values[-1]!r} is not a number") from None
    return organization, user, weight


def _queue_stats_table(stats: Sequence[Any]) -> Table:
    table = Table(title="Queue stats", title_justify="left")
    columns = ("model", "queued", "running", "completed", "failed", "cancelled", "expired")
    for column in (*columns, "rejected", "dead", "max size", "timeout", "avg wait"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for stat in stats:
        config = stat.config
        table.add_row(
            config.model,
            *(str(getattr(stat, name)) for name in columns[1:]),
            str(stat.rejected),
            str(stat.dead_letters),
            str(config.max_queue_size),
            f"{config.queue_timeout.ToMilliseconds() / 1000:g}s",
            f"{stat.avg_queue_wait.ToMilliseconds() / 1000:.1f}s",
        )
    return table


# -- arguments ------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    s = argparse.SUPPRESS
    group.add_argument("--scheduler", default=s, help="Scheduler address (USHER_SCHEDULER_ADDRESS)")
    group.add_argument("--notifier", default=s, help="Notifier address (USHER_NOTIFIER_ADDRESS)")
    group.add_argument("--pool", default=s, help="Pool address (USHER_POOL_ADDRESS)")
    group.add_argument("--token", default=s, help="API key or JWT (USHER_TOKEN)")
    group.add_argument("--ca", default=s, help="PEM file of the CA for TLS (USHER_TLS_CA)")
    group.add_argument(
        "--timeout", default=s, type=parse_duration, help="deadline of each call (10s)"
    )
    group.add_argument(
        "--retry-for",
        default=s,
        type=parse_duration,
        help="keep retrying a busy or unreachable service this long (30s; 0: no retries)",
    )
    return common


def _request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("prompt", help='the prompt ("-" reads standard input)')
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--priority", help="critical, high, normal, low or batch")
    parser.add_argument("--fallback", help="none, after-timeout or local-only")
    parser.add_argument("--queue-timeout", type=parse_duration, help="longest wait in the queue")
    parser.add_argument(
        "--deadline", type=parse_duration, help="the answer is useless after this long"
    )
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate (num_predict)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--format", help='"json" or a JSON schema')
    parser.add_argument("--label", action="append", metavar="KEY=VALUE")
    parser.add_argument("--idempotency-key", help="a retried submit with it returns the original")
    parser.add_argument("--json", action="store_true", help="print the final request as JSON")


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(
        prog="usher",
        description="Usher: one fair queue in front of a fleet of local LLM servers.",
        parents=[common],
        epilog="Exit codes: 1 failed, 2 bad input, 3 not found or not allowed, "
        "4 unavailable or busy, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common])

    up = commands.add_parser(
        "up",
        help="run all of Usher on this machine, as `make up` does (usher up --help)",
        add_help=False,
    )
    up.add_argument("up_args", nargs=argparse.REMAINDER)
    commands.add_parser(
        "serve",
        help="run Scheduler, Pool, Notifier and the HTTP gateway in this one process "
        "(settings from USHER_*; Redis and model servers run apart)",
        add_help=False,
    )

    chat = sub("chat", "ask a model; see your place in the queue, then the answer as it comes")
    _request_options(chat)
    chat.set_defaults(handler=cmd_chat)

    submit = sub("submit", "queue a request and print its id")
    _request_options(submit)
    submit.add_argument(
        "--generate", action="store_true", help="a raw completion instead of a chat"
    )
    submit.set_defaults(handler=cmd_submit)

    watch = sub("watch", "follow a request until it ends (Ctrl-C stops watching)")
    watch.add_argument("id")
    watch.add_argument("--last-event-id", help="resume after this event")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(handler=cmd_watch)

    get = sub("get", "show one request")
    get.add_argument("id")
    get.add_argument("--json", action="store_true")
    get.set_defaults(handler=cmd_get)

    cancel = sub("cancel", "cancel a request")
    cancel.add_argument("id")
    cancel.add_argument("--reason")
    cancel.set_defaults(handler=cmd_cancel)

    switch = sub("switch", "move a waiting request to the external provider")
    switch.add_argument("id")
    switch.set_defaults(handler=cmd_switch)

    listing = sub("list", "your requests, newest first")
    listing.add_argument("--model")
    listing.add_argument("--state", action="append", default=[], help="e.g. queued, completed")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    top = sub("top", "live queues per model (and the fleet, with --pool)")
    top.add_argument("models", nargs="*", help="only these models")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=parse_duration, default=1.0, help="refresh period (1s)")
    top.set_defaults(handler=cmd_top)

    admin = sub("admin", "operator commands (needs an admin token)")
    admin.set_defaults(handler=cmd_admin)
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        parser.add_argument("--json", action="store_true")
        return parser

    queue_config = action("queue-config", "change a model's queue limits")
    queue_config.add_argument("model")
    queue_config.add_argument("--max-queue-size", type=int)
    queue_config.add_argument("--queue-timeout", type=parse_duration)
    queue_config.add_argument("--max-attempts", type=int)
    queue_config.add_argument("--lease", type=parse_duration, help="lease duration")
    queue_config.add_argument("--parallel", type=int, help="slots assumed for ETAs")
    queue_stats = action("queue-stats", "counters and limits of the queues")
    queue_stats.add_argument("models", nargs="*")
    tenant = action("tenant-weight", "a tenant's fair share: ORG [USER] WEIGHT")
    tenant.add_argument("values", nargs="+", metavar="ORG [USER] WEIGHT")
    dead = action("dead-letters", "requests that failed every attempt")
    dead.add_argument("model")
    dead.add_argument("--limit", type=int, default=50)
    action("instances", "the model-server instances")
    drain = action("drain", "stop sending new work to an instance")
    drain.add_argument("id")
    drain.add_argument("--undo", action="store_true", help="resume the instance")
    weight = action("weight", "an instance's share of traffic")
    weight.add_argument("id")
    weight.add_argument("weight", type=float)
    reset = action("reset-circuit", "close an instance's circuit breaker")
    reset.add_argument("id")
    reset.add_argument("--model", help="only the (instance, model) circuit")
    load = action("load", "load a model on an instance")
    load.add_argument("id")
    load.add_argument("model")
    load.add_argument(
        "--keep-alive",
        type=parse_keep_alive,
        help="keep it loaded at least this long (e.g. 8h), or forever (until unload)",
    )
    unload = action("unload", "unload a model from an instance")
    unload.add_argument("id")
    unload.add_argument("model")
    pull = action("pull", "download a model onto every local instance (or one), with progress")
    pull.add_argument("model")
    pull.add_argument("--instance", help="only this instance")
    retry = action("retry-dead-letter", "queue a dead-lettered request again")
    retry.add_argument("request_id")
    register = action("register", "add a model-server instance")
    register.add_argument("id")
    register.add_argument("url")
    register.add_argument("--kind", choices=("ollama", "openai"), default="ollama")
    register.add_argument("--weight", type=float, default=1.0)
    register.add_argument("--parallel", type=int, default=0)
    register.add_argument("--role", action="append", help="chat, embedding")
    register.add_argument("--memory", type=int, default=0, help="memory budget, bytes")
    register.add_argument("--max-loaded-models", type=int, default=0)
    register.add_argument("--preload", action="append")
    register.add_argument("--allowed-model", action="append")
    register.add_argument("--external", action="store_true", help="an external provider")
    register.add_argument("--api-key-env", help="variable holding the provider's API key")
    deregister = action("deregister", "remove a model-server instance")
    deregister.add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["up"]:  # a service in the foreground, not a call: its own options
        from clients import up

        return up.main(arguments[1:])
    if arguments[:1] == ["serve"]:  # the all-in-one server in the foreground
        from clients import serve

        return serve.main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    out = _Out()
    handler: Callable[[argparse.Namespace, _Out], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args, out))
    except UsherError as error:
        out.error(error.describe())
        return exit_code_for(error)
    except (ValueError, OSError) as error:
        out.error(str(error))
        return EXIT_BAD_INPUT if isinstance(error, ValueError) else EXIT_FAILED
    except (KeyboardInterrupt, asyncio.CancelledError):
        out.note("usher: interrupted")
        return EXIT_INTERRUPTED
    except TimeoutError:
        out.error("timed out")
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
