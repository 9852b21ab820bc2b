"""OpenAI's API over HTTP: its route table and handlers (the shapes are ``openai_shapes``).

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (the legacy text completion),
  ``POST /v1/embeddings``: Submitted and watched (``exchange.ApiRoutes``). A stream is SSE
  ``data: {...}`` chunks ending in ``data: [DONE]``; while queued it carries a comment
  every few seconds (``: queued 3 of 7, about 2–3 minutes``), which the openai client
  ignores and proxies count as traffic; an error after the headers is a
  ``data: {"error": {...}}`` event.
* ``GET /v1/models``, ``GET /v1/models/{model}``.
"""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from services.gateway import status, views
from services.gateway.bodies import Parsed
from services.gateway.errors import GatewayError, model_not_found, openai_error_body
from services.gateway.exchange import ApiRoutes, Exchange
from services.gateway.flow import RequestFlow, Started, Text
from services.gateway.openai_shapes import (
    OpenAIFrames,
    openai_chat,
    openai_completion,
    openai_embeddings,
    openai_embeddings_response,
    openai_text_completion,
    openai_text_completion_body,
)
from services.gateway.responses import json_response
from services.gateway.streams import SSE, Keepalive
from usher import messages

__all__ = ["OpenAIHttp"]


class OpenAIHttp(ApiRoutes):
    api = "openai"

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.text)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model)

    # -- models --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, openai_chat, self._chat)

    async def text(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, openai_text_completion, self._text)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_request(request, openai_embeddings, self._embedding)

    async def _chat(self, ex: Exchange, parsed: Parsed, flow: RequestFlow) -> web.StreamResponse:
        frames = OpenAIFrames(
            f"chatcmpl-{flow.request_id}", int(time.time()), parsed.model, parsed.include_usage
        )
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = openai_completion(frames.completion_id, frames.created, parsed.model, done)
            return json_response(body, headers=self._headers(done))
        return await self._stream(ex, flow, frames)

    async def _text(self, ex: Exchange, parsed: Parsed, flow: RequestFlow) -> web.StreamResponse:
        """The legacy text completion: one object, or SSE pieces ending in ``[DONE]``."""
        frames = OpenAIFrames(
            f"cmpl-{flow.request_id}",
            int(time.time()),
            parsed.model,
            parsed.include_usage,
            text_completion=True,
        )
        if not parsed.stream:
            done = await self._finished(ex, flow)
            body = openai_text_completion_body(
                frames.completion_id, frames.created, parsed.model, done
            )
            return json_response(body, headers=self._headers(done))
        return await self._stream(ex, flow, frames)

    async def _stream(
        self, ex: Exchange, flow: RequestFlow, frames: OpenAIFrames
    ) -> web.StreamResponse:
        """An SSE answer: headers at once, then (while queued) a comment every few seconds
        ("queued 3 of 7, about 2–3 minutes": the openai client ignores it, proxies see
        traffic), the model's pieces, the ending and ``[DONE]``; errors in-stream."""
        response = await self._open_stream(ex, SSE, flow)
        keepalive = Keepalive(
            response,
            self.settings.keepalive_seconds,
            lambda: status.sse_comment(messages.queued_comment(flow.latest)),
        )
        try:
            async with contextlib.aclosing(flow.events()) as events:
                async for event in events:
                    if isinstance(event, Started):
                        keepalive.stop()
                        self._observe_wait("openai", event.queue_wait_ms)
                        frame = frames.opening()
                    elif isinstance(event, Text):
                        frame = [frames.text(event.text)]
                    else:
                        frame = frames.ending(event.request)
                    if frame:
                        await response.write(b"".join(status.sse_event(f) for f in frame))
            await response.write(b"data: [DONE]\n\n")
        except GatewayError as error:
            self.metrics.errors.labels(error.code).inc()
            await response.write(status.sse_event(openai_error_body(error)))
        finally:
            keepalive.stop()
        await response.write_eof()
        return response

    async def _embedding(
        self, ex: Exchange, parsed: Parsed, flow: RequestFlow
    ) -> web.StreamResponse:
        done = await self._finished(ex, flow)
        body = openai_embeddings_response(parsed.model, done, parsed.encoding_format)
        return json_response(body, headers=self._headers(done))

    # -- metadata ------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "openai")
        try:
            instances = await self._fleet()
        except GatewayError as error:
            return self._error(ex, error)
        return json_response(views.openai_models_body(instances))

    async def model(self, request: web.Request) -> web.Response:
        ex = Exchange(request, "openai")
        name = request.match_info["model"]
        try:
            instances = await self._fleet()
            resolved = views.resolve_model(name, views.catalogue(instances))
            if resolved is None:
                raise model_not_found(name, request.path)
        except GatewayError as error:
            return self._error(ex, error)
        return json_response({"id": resolved, "object": "model", "created": 0, "owned_by": "usher"})
