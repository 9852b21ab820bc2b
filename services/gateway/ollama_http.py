"""Ollama's API over HTTP: its route table and handlers (the shapes are ``ollama_shapes``).

* ``GET|HEAD /``, ``GET /api/version``, ``GET /api/tags``, ``GET /api/ps`` (across the
  fleet), ``POST /api/show``.
* ``POST /api/chat``, ``/api/generate`` (NDJSON stream by default), ``/api/embed``,
  ``/api/embeddings``: Submitted and watched (``exchange.ApiRoutes``). An Ollama stream is
  silent while queued (its clients parse every line); an error after the headers is an
  ``{"error": ..., "code": ...}`` line.
* ``POST /api/pull`` (admins: onto every local instance, with progress);
  ``/api/push|create|copy|delete`` answer 501.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from aiohttp import web

from services.gateway import views
from services.gateway.backend import bearer
from services.gateway.bodies import EMPTY_MODEL, Parsed
from services.gateway.errors import GatewayError, model_not_found, rpc_error
from services.gateway.exchange import ApiRoutes, Exchange
from services.gateway.flow import RequestFlow, Started, Text
from services.gateway.ollama_shapes import (
    ollama_chat,
    ollama_chunk,
    ollama_embed,
    ollama_embed_response,
    ollama_embeddings,
    ollama_embeddings_response,
    ollama_final,
    ollama_generate,
    ollama_shortcut_final,
)
from services.gateway.responses import NDJSON, json_response, ndjson_line
from usher.v1 import pool_pb2

__all__ = ["OllamaHttp"]


class OllamaHttp(ApiRoutes):
    api = "ollama"

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/chat", self.chat)
        r.add_post("/api/generate", self.generate)
        r.add_post("/api/embed", self.embed)
        r.add_post("/api/embeddings", self.embeddings)
        r.add_post("/api/pull", self.pull)
        for name in ("push", "create", "copy", "delete"):
            r.add_route("*", f"/api/{name}", self.not_supported)

    # -- models --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, ollama_chat, self._text)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, ollama_generate, self._text)

    async def embed(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, ollama_embed, self._embedding)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, ollama_embeddings, self._embedding)

    def _shortcut_answer(self, parsed: Parsed) -> dict[str, Any]:
        return ollama_shortcut_final(parsed.kind, parsed.model, parsed.shortcut)

    async def _text(self, ex: Exchange, parsed: Parsed, flow: RequestFlow) -> web.StreamResponse:
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = ollama_final(parsed.kind, parsed.model, done, stream=False)
            return json_response(body, headers=self._headers(done))
        response = await self._open_stream(ex, NDJSON, flow)
        try:
            async with contextlib.aclosing(flow.events()) as events:
                async for event in events:
                    if isinstance(event, Started):
                        self._observe_wait("ollama", event.queue_wait_ms)
                    elif isinstance(event, Text):
                        await response.write(
                            ndjson_line(ollama_chunk(parsed.kind, parsed.model, event.text))
                        )
                    else:
                        final = ollama_final(parsed.kind, parsed.model, event.request, stream=True)
                        await response.write(ndjson_line(final))
        except GatewayError as error:
            # Headers are gone: Ollama reports a failure mid-stream as an error line.
            self.metrics.errors.labels(error.code).inc()
            await response.write(ndjson_line({"error": error.message, "code": error.code}))
        await response.write_eof()
        return response

    async def _embedding(
        self, ex: Exchange, parsed: Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        done = await self._finished(ex, flow)
        body: dict[str, Any]
        if parsed.kind == "embeddings":
            body = ollama_embeddings_response(done)
        else:
            body = ollama_embed_response(parsed.model, done)
        return json_response(body, headers=self._headers(done))

    # -- metadata ------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.settings.ollama_version})

    async def tags(self, request: web.Request) -> web.Response:
        return await self._models_view(request, views.tags_body)

    async def ps(self, request: web.Request) -> web.Response:
        return await self._models_view(request, views.ps_body)

    async def _models_view(
        self,
        request: web.Request,
        render: Callable[
            [Sequence[pool_pb2.InstanceStatus], Mapping[str, Mapping[str, Any]]], dict[str, Any]
        ],
    ) -> web.Response:
        """The fleet's models as /api/tags or /api/ps shows them."""
        ex = Exchange(request, "ollama")
        try:
            instances = await self._fleet()
        except GatewayError as error:
            return self._error(ex, error)
        metadata = await self.backend.tag_metadata(instances)
        return json_response(render(instances, metadata))

    async def show(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "ollama")
        try:
            body = await self._body(request)
            name = body.get("model") or body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise GatewayError(400, "invalid_request", EMPTY_MODEL, field="model")
            ex.model = name
            instances = await self._fleet()
            resolved = views.resolve_model(name, views.catalogue(instances))
            if resolved is None:
                raise model_not_found(name, request.path)
        except GatewayError as error:
            return self._error(ex, error)
        answer = await self.backend.show(resolved, {"verbose": bool(body.get("verbose"))})
        return json_response(answer or views.synthesized_show(resolved, instances))

    # -- model management ------------------------------------------------------------------

    async def pull(self, request: web.Request) -> web.StreamResponse:
        """Ollama's pull, onto every local instance (PoolAdmin.PullModel; admins only):
        NDJSON progress lines in Ollama's shape, or one ``{"status": "success"}``."""
        ex = Exchange(request, "ollama")
        try:
            token = self._token(request, allow_default=False)
            body = await self._body(request)
            name = body.get("model") or body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise GatewayError(400, "invalid_request", EMPTY_MODEL, field="model")
            ex.model = name.strip()
            call = self.backend.pool_admin.PullModel(
                pool_pb2.PullModelRequest(model=ex.model), metadata=bearer(token)
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, ex.model) from None
        except GatewayError as error:
            return self._error(ex, error)
        if body.get("stream") is False:
            return await self._pull_result(ex, call)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        ex.response = response
        line = first
        try:
            while isinstance(line, pool_pb2.PullModelResponse):
                await response.write((json.dumps(_pull_line(line)) + "\n").encode())
                line = await call.read()
            await response.write(b'{"status":"success"}\n')
        except grpc.aio.AioRpcError as exc:
            await response.write((json.dumps({"error": exc.details()}) + "\n").encode())
        await response.write_eof()
        return response

    async def _pull_result(
        self,
        ex: Exchange,
        call: grpc.aio.UnaryStreamCall[pool_pb2.PullModelRequest, pool_pb2.PullModelResponse],
    ) -> web.Response:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return self._error(ex, rpc_error(exc, ex.model))
        return json_response({"status": "success"})

    async def not_supported(self, request: web.Request) -> web.Response:
        return self._error(
            Exchange(request, "ollama"),
            GatewayError(
                501,
                "not_implemented",
                f"{request.path} is not offered by the Usher gateway; "
                "manage models on the instances (the Pool places and loads them)",
            ),
        )


def _pull_line(progress: pool_pb2.PullModelResponse) -> dict[str, Any]:
    """A pull progress line as Ollama writes it (empty fields left out); the instance's
    "success" is one of several, so it reads as that instance's."""
    status = progress.status
    if status == "success":
        status = f"success on {progress.instance}"
    line: dict[str, Any] = {"status": status}
    if progress.digest:
        line["digest"] = progress.digest
    if progress.total:
        line["total"] = progress.total
    if progress.completed:
        line["completed"] = progress.completed
    return line
