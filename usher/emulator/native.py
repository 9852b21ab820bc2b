"""aiohttp handlers for Ollama's native API (``/``, ``/api/*``).

Each handler follows the order of checks in Ollama's ``server/routes.go`` so the
same bad request gets the same status and message: body decoding, model name,
model existence, unload shortcut, capabilities, scheduling, load shortcut, run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web

from usher.emulator import protocol, textgen
from usher.emulator.config import ModelSpec, model_spec
from usher.emulator.engine import (
    ApiError,
    Done,
    Engine,
    Event,
    GenerationJob,
    Tokens,
)
from usher.emulator.httputil import (
    dumps,
    error_response,
    fail_generation,
    json_response,
    start_stream,
)
from usher.emulator.scheduler import Lease
from usher.emulator.tools import ToolChoice, choose_tool, ollama_tool_call

__all__ = ["NativeApi", "display_name", "tool_arguments"]

NDJSON = "application/x-ndjson"


def display_name(name: str) -> str:
    """Ollama's ``DisplayShortest``: the name with its tag, default host dropped."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def _think_requested(think: bool | str | None) -> bool:
    return think is True or isinstance(think, str)


class NativeApi:
    """The ``/api`` routes of one instance."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root)  # aiohttp adds HEAD for GET routes
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/generate", self.generate)
        r.add_post("/api/chat", self.chat)
        r.add_post("/api/embed", self.embed)
        r.add_post("/api/embeddings", self.embeddings)
        r.add_post("/api/pull", self.pull)

    # -- metadata -------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.engine.config.version})

    async def tags(self, request: web.Request) -> web.Response:
        models = [protocol.tags_entry(spec) for spec in self.engine.config.models]
        return json_response({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        loaded = [protocol.ps_entry(m) for m in self.engine.scheduler.loaded()]
        return json_response({"models": loaded})

    async def show(self, request: web.Request) -> web.Response:
        try:
            body = protocol.decode_body(await request.read(), "ShowRequest")
            model = protocol.str_field(body, "ShowRequest", "model") or protocol.str_field(
                body, "ShowRequest", "name"
            )
            if not model:
                raise ApiError(400, "model is required")
            if protocol.model_name_error(model):
                raise ApiError(400, "invalid model name")
            spec = self.engine.resolve(model)
            if spec is None:
                raise ApiError(404, f"model '{display_name(model)}' not found")
            dim = self.engine.config.embedding_dim_for(spec)
            return json_response(protocol.show_body(spec, dim))
        except ApiError as exc:
            return error_response(exc.status, exc.message)

    async def pull(self, request: web.Request) -> web.StreamResponse:
        """Ollama's pull: progress lines ("pulling manifest", "pulling <digest>" with total
        and completed bytes, "verifying sha256 digest", "writing manifest", "success"); the
        model is then listed. Any valid name can be pulled (sizes from its tag)."""
        try:
            body = protocol.decode_body(await request.read(), "PullRequest")
            model = protocol.str_field(body, "PullRequest", "model") or protocol.str_field(
                body, "PullRequest", "name"
            )
            if not model:
                raise ApiError(400, "model is required")
            if protocol.model_name_error(model):
                raise ApiError(400, "invalid model name")
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        spec = self.engine.resolve(model) or model_spec(model)
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        if self.engine.resolve(model) is None:
            for part in range(1, 5):
                steps.append(
                    {
                        "status": f"pulling {spec.digest[:12]}",
                        "digest": f"sha256:{spec.digest}",
                        "total": spec.size,
                        "completed": spec.size * part // 4,
                    }
                )
        steps += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if self.engine.resolve(model) is None:
            self.engine.config.models.append(spec)
        if body.get("stream") is False:
            return json_response({"status": "success"})
        resp = await start_stream(request, NDJSON)
        for step in steps:
            await resp.write((dumps(step) + "\n").encode())
        await resp.write_eof()
        return resp

    # -- inference ------------------------------------------------------------

    def _resolve(self, name: str, *, empty: ApiError) -> ModelSpec:
        if not name:
            raise empty
        if protocol.model_name_error(name):
            raise ApiError(400, "invalid model name")
        spec = self.engine.resolve(name)
        if spec is None:
            raise ApiError(404, f"model '{name}' not found")
        return spec

    def _fail_if_armed(self) -> None:
        failure = self.engine.take_failure()
        if failure is not None:
            raise failure

    def _check_think(self, spec: ModelSpec, model: str, think: bool | str | None) -> None:
        if _think_requested(think) and "thinking" not in spec.capabilities:
            raise ApiError(400, f"{protocol.go_quote(model)} does not support thinking")

    async def _respond(
        self, handler: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Count the request and turn ``ApiError`` into Ollama's error body."""
        stats = self.engine.stats
        stats.requests_received += 1
        try:
            resp = await handler()
        except ApiError as exc:
            stats.requests_failed += 1
            return error_response(exc.status, exc.message)
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            body = protocol.decode_body(await request.read(), "GenerateRequest")
            p = protocol.parse_generate(body)
            spec = self._resolve(p.model, empty=ApiError(404, f"model '{p.model}' not found"))
            self._fail_if_armed()
            engine = self.engine
            if not p.prompt and p.keep_alive == 0:
                return self._unloaded(
                    spec, protocol.generate_final(p.model, text="", done_reason="unload")
                )
            if p.raw and (p.template or p.system or p.context is not None):
                raise ApiError(400, "raw mode does not support template, system, or context")
            self._check_think(spec, p.model, p.think)
            lease, opts = await self._lease(
                spec, p.model, "generate", p.options, p.keep_alive, bool(p.prompt)
            )
            try:
                if not p.prompt:
                    engine.stats.requests_served += 1
                    return json_response(
                        protocol.generate_final(p.model, text="", done_reason="load")
                    )
                job = GenerationJob(
                    spec=spec,
                    key=protocol.prompt_key(
                        spec, "generate", p.system, p.prompt, p.context, p.suffix
                    ),
                    prompt_tokens=protocol.generate_prompt_tokens(p),
                    num_predict=opts.num_predict,
                    seed=opts.seed or 0,
                    format=p.format,
                    started=started,
                )

                def final(done: Done, text: str) -> dict[str, Any]:
                    context = None if p.raw else textgen.token_ids(p.prompt + done.text)
                    return protocol.generate_final(
                        p.model,
                        text=text,
                        done_reason=done.done_reason,
                        metrics=done.metrics,
                        context=context,
                    )

                return await self._render(
                    request,
                    spec,
                    engine.generate(job, lease),
                    stream=p.stream,
                    chunk=lambda t: protocol.generate_chunk(p.model, t),
                    final=final,
                )
            finally:
                engine.release(lease)

        return await self._respond(run)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            body = protocol.decode_body(await request.read(), "ChatRequest")
            p = protocol.parse_chat(body)
            spec = self._resolve(p.model, empty=ApiError(400, "model is required"))
            self._fail_if_armed()
            engine = self.engine
            if not p.messages and p.keep_alive == 0:
                return self._unloaded(
                    spec, protocol.chat_final(p.model, text="", done_reason="unload")
                )
            self._check_think(spec, p.model, p.think)
            lease, opts = await self._lease(
                spec, p.model, "chat", p.options, p.keep_alive, bool(p.messages)
            )
            try:
                if not p.messages:
                    engine.stats.requests_served += 1
                    return json_response(protocol.chat_final(p.model, text="", done_reason="load"))
                tool = choose_tool(p.tools, p.messages)
                job = GenerationJob(
                    spec=spec,
                    key=protocol.prompt_key(spec, "chat", json.dumps(p.messages)),
                    prompt_tokens=protocol.chat_prompt_tokens(p.messages),
                    num_predict=opts.num_predict,
                    seed=opts.seed or 0,
                    # A tool call's arguments are structured output in the tool's schema.
                    format=tool.schema if tool else p.format,
                    started=started,
                )
                return await self._render(
                    request,
                    spec,
                    engine.generate(job, lease),
                    stream=p.stream,
                    chunk=lambda t: protocol.chat_chunk(p.model, t),
                    final=lambda done, text: protocol.chat_final(
                        p.model, text=text, done_reason=done.done_reason, metrics=done.metrics
                    ),
                    tool=tool,
                )
            finally:
                engine.release(lease)

        return await self._respond(run)

    def _unloaded(self, spec: ModelSpec, answer: dict[str, Any]) -> web.Response:
        """An empty request with ``keep_alive: 0``: unload the model now."""
        self.engine.scheduler.expire(spec.name)
        self.engine.stats.requests_served += 1
        return json_response(answer)

    async def _lease(
        self,
        spec: ModelSpec,
        model: str,
        api: str,
        options: object,
        keep_alive: float | None,
        has_input: bool,
    ) -> tuple[Lease, protocol.Options]:
        """The model loaded (and a slot, when there is input to run) for a text request;
        a model that cannot complete text is refused as Ollama does."""
        if "completion" not in spec.capabilities:
            raise ApiError(400, f"{protocol.go_quote(model)} does not support {api}")
        opts = protocol.parse_options(options)
        num_ctx = self.engine.default_num_ctx(spec, opts.num_ctx)
        lease = await self.engine.acquire(
            spec, num_ctx=num_ctx, keep_alive=keep_alive, slot=has_input
        )
        return lease, opts

    async def _render(
        self,
        request: web.Request,
        spec: ModelSpec,
        events: AsyncGenerator[Event, None],
        *,
        stream: bool,
        chunk: Callable[[str], dict[str, Any]],
        final: Callable[[Done, str], dict[str, Any]],
        tool: ToolChoice | None = None,
    ) -> web.StreamResponse:
        """NDJSON stream (or one object when ``stream: false``) from engine events. With a
        ``tool``, the generated text is the call's arguments: nothing streams until the call
        is complete, then it goes out in one chunk (as Ollama parses a model's tool call)."""
        engine = self.engine
        model_stats = engine.stats.model(spec.name)
        resp: web.StreamResponse | None = None
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Tokens):
                    if stream and tool is None:
                        if resp is None:
                            resp = await start_stream(request, NDJSON)
                        await resp.write(
                            "".join(dumps(chunk(t)) + "\n" for t in event.texts).encode()
                        )
                elif isinstance(event, Done):
                    model_stats.completed += 1
                    engine.stats.requests_served += 1
                    calls = (
                        [ollama_tool_call(tool.name, tool_arguments(event.text))] if tool else []
                    )
                    text = "" if tool else event.text
                    if not stream:
                        return json_response(_with_calls(final(event, text), calls))
                    if resp is None:
                        resp = await start_stream(request, NDJSON)
                    if calls:
                        await resp.write((dumps(_with_calls(chunk(""), calls)) + "\n").encode())
                    await resp.write((dumps(final(event, "")) + "\n").encode())
                    await resp.write_eof()
                    return resp
                else:
                    return await fail_generation(
                        request, engine, model_stats, resp, event, _error_line
                    )
        raise ApiError(500, "generation ended without a result")

    async def embed(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()

        async def run() -> web.StreamResponse:
            body = protocol.decode_body(await request.read(), "EmbedRequest")
            p = protocol.parse_embed(body)
            spec = self._resolve(p.model, empty=ApiError(404, f"model '{p.model}' not found"))
            self._fail_if_armed()
            result = await self.embed_core(
                spec, p.model, p.inputs, p.options, p.keep_alive, p.dimensions, started
            )
            return json_response(result)

        return await self._respond(run)

    async def embed_core(
        self,
        spec: ModelSpec,
        model: str,
        inputs: list[str],
        options: object,
        keep_alive: float | None,
        dimensions: int | None,
        started: float,
    ) -> dict[str, Any]:
        """Schedule and run an embedding; returns the /api/embed body."""
        engine = self.engine
        opts = protocol.parse_options(options)
        num_ctx = engine.default_num_ctx(spec, opts.num_ctx)
        lease = await engine.acquire(
            spec, num_ctx=num_ctx, keep_alive=keep_alive, slot=bool(inputs)
        )
        try:
            loaded = time.perf_counter()
            if not inputs:
                engine.stats.requests_served += 1
                return {"model": model, "embeddings": []}
            vectors, tokens = await engine.embed(spec, inputs, dimensions)
            engine.stats.model(spec.name).completed += 1
            engine.stats.requests_served += 1
            out: dict[str, Any] = {"model": model, "embeddings": vectors}
            out["total_duration"] = max(1, int((time.perf_counter() - started) * 1e9))
            out["load_duration"] = max(1, int((loaded - started) * 1e9))
            if tokens:
                out["prompt_eval_count"] = tokens
            return out
        finally:
            engine.release(lease)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        async def run() -> web.StreamResponse:
            body = protocol.decode_body(await request.read(), "EmbeddingRequest")
            p = protocol.parse_embeddings(body)
            if not p.model:
                raise ApiError(400, "model is required")
            if protocol.model_name_error(p.model):
                raise ApiError(400, "invalid model name")
            spec = self.engine.resolve(p.model)
            if spec is None:
                raise ApiError(
                    404, f"model {protocol.go_quote(p.model)} not found, try pulling it first"
                )
            self._fail_if_armed()
            result = await self.embed_core(
                spec,
                p.model,
                [p.prompt] if p.prompt else [],
                p.options,
                p.keep_alive,
                None,
                time.perf_counter(),
            )
            vectors = result["embeddings"]
            return json_response({"embedding": vectors[0] if vectors else []})

        return await self._respond(run)


def tool_arguments(text: str) -> dict[str, Any]:
    """A generated call's arguments (an empty object when generation was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _with_calls(body: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    if calls:
        body["message"]["tool_calls"] = calls
    return body


def _error_line(message: str) -> bytes:
    """Ollama's NDJSON error line, ending a stream that has started."""
    return (dumps({"error": message}) + "\n").encode()
