"""One emulated Ollama instance on a TCP port: the aiohttp application (native
API, OpenAI-compatible API, admin API) and ``EmulatorServer`` to run it in the
current event loop, crash it and restart it.

Admin API (never affected by injected faults):

* ``GET /_emulator/stats`` counters; ``DELETE /_emulator/stats`` resets them.
* ``GET|POST|DELETE /_emulator/faults`` read / merge / clear ``FaultConfig``;
  ``{"crash": true}`` in the POST body crashes the instance after answering.
* ``POST /_emulator/crash`` crash now (process exit, or listener and
  connections closed for in-process instances).
* ``GET|POST /_emulator/config`` read config / change speed settings.
* ``POST /_emulator/reset`` clear faults, unload every idle model, zero stats.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web

from usher.emulator.config import EmulatorConfig, FaultConfig
from usher.emulator.engine import Engine
from usher.emulator.httputil import json_response
from usher.emulator.native import NativeApi
from usher.emulator.openai_compat import OpenAIApi
from usher.emulator.stats import EmulatorStats

__all__ = ["CRASH_EXIT_CODE", "CrashMode", "EmulatorServer", "create_app"]

log = logging.getLogger("usher.emulator")

#: Exit status of a crashed emulator process (like a SIGKILLed one).
CRASH_EXIT_CODE = 137

CrashMode = Literal["close", "exit"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _gin_style_errors(engine_ref: Callable[[], Engine]) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if not request.path.startswith("/_emulator"):
            # Injected "hang": the API stops answering (admin keeps working).
            await engine_ref().wait_unhung()
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.Response(status=404, text="404 page not found", content_type="text/plain")
        except web.HTTPMethodNotAllowed:
            return web.Response(
                status=405, text="405 method not allowed", content_type="text/plain"
            )

    return middleware


class _AdminApi:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/_emulator/stats", self.get_stats)
        r.add_delete("/_emulator/stats", self.reset_stats)
        r.add_get("/_emulator/faults", self.get_faults)
        r.add_post("/_emulator/faults", self.set_faults)
        r.add_delete("/_emulator/faults", self.clear_faults)
        r.add_post("/_emulator/crash", self.crash)
        r.add_get("/_emulator/config", self.get_config)
        r.add_post("/_emulator/config", self.set_config)
        r.add_post("/_emulator/reset", self.reset)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"error":"invalid JSON"}', content_type="application/json"
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text='{"error":"expected a JSON object"}', content_type="application/json"
            )
        return body

    async def get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.server.stats_snapshot())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.engine.stats.reset()
        return json_response(self.server.stats_snapshot())

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.engine.config.faults.to_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        crash = body.pop("crash", False)
        try:
            self.engine.config.faults.update(body)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        self.engine.faults_changed()
        if crash:
            self.server.crash_soon()
        return json_response(self.engine.config.faults.to_dict())

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.engine.config.faults.clear()
        self.engine.faults_changed()
        return json_response(self.engine.config.faults.to_dict())

    async def crash(self, request: web.Request) -> web.Response:
        self.server.crash_soon()
        return json_response({"crashing": True})

    async def get_config(self, request: web.Request) -> web.Response:
        return json_response(self.engine.config.to_dict())

    async def set_config(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            self.engine.config.apply_runtime(body)
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response(self.engine.config.to_dict())

    async def reset(self, request: web.Request) -> web.Response:
        self.engine.config.faults.clear()
        self.engine.faults_changed()
        self.engine.scheduler.unload_all()
        self.engine.stats.reset()
        return json_response(self.server.stats_snapshot())


def create_app(engine_ref: Callable[[], Engine], server: EmulatorServer) -> web.Application:
    """The full application; ``engine_ref`` lets a restarted server swap engines."""
    app = web.Application(middlewares=[_gin_style_errors(engine_ref)])
    native = NativeApi(server.engine)
    native.register(app)
    OpenAIApi(native).register(app)
    _AdminApi(server).register(app)
    return app


class EmulatorServer:
    """Run one emulated Ollama instance inside the current event loop.

    ``crash_mode="close"`` (default) makes a crash close the listener and abort
    every connection, so clients see connection errors, while the rest of the
    process lives on; ``"exit"`` ends the whole process (used by the CLI).
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        crash_mode: CrashMode = "close",
        access_log: bool = False,
    ) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.crash_mode: CrashMode = crash_mode
        self._access_log = access_log
        self.engine = Engine(self.config, on_crash=self.crash_soon)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._crash_task: asyncio.Task[None] | None = None
        self.crashed = False

    # -- properties -------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def stats(self) -> EmulatorStats:
        return self.engine.stats

    @property
    def faults(self) -> FaultConfig:
        return self.config.faults

    def set_faults(self, **changes: Any) -> None:
        """Python-side equivalent of ``POST /_emulator/faults``."""
        self.config.faults.update(changes)
        self.engine.faults_changed()

    def clear_faults(self) -> None:
        self.config.faults.clear()
        self.engine.faults_changed()

    def stats_snapshot(self) -> dict[str, Any]:
        out = self.engine.stats.to_dict()
        out["memory_used"] = self.engine.scheduler.memory_used
        out["loaded"] = [
            {"name": m.spec.name, "num_ctx": m.num_ctx, "busy": m.busy, "size": m.size}
            for m in self.engine.scheduler.loaded()
        ]
        return out

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> str:
        """Bind (port 0 picks a free one) and serve; returns the base URL."""
        if self._runner is not None:
            return self.url
        self.crashed = False
        app = create_app(lambda: self.engine, self)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=log if self._access_log else None,
            handler_cancellation=True,  # a disconnect cancels the request, freeing its slot
            shutdown_timeout=0.5,
        )
        await runner.setup()
        port = self._port if self._port is not None else self.config.port
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        if not self.config.name:
            self.config.name = self.url
        log.info("emulator listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Graceful stop: in-flight requests are cancelled, models unloaded."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await self.engine.close()
        await runner.cleanup()

    async def crash(self) -> None:
        """Die abruptly: close the listener and abort every open connection."""
        if self.crash_mode == "exit":
            os._exit(CRASH_EXIT_CODE)
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.crashed = True
        log.warning("emulator %s crashing (fault injection)", self.config.name)
        for site in list(runner.sites):
            await site.stop()
        server = runner.server
        if server is not None:
            for handler in server.connections:
                transport = handler.transport
                if transport is not None:
                    transport.abort()
        await self.engine.close()
        await runner.cleanup()

    def crash_soon(self) -> None:
        """Crash from inside a handler: after the current response goes out."""
        if self.crash_mode == "exit":
            asyncio.get_running_loop().call_later(0.05, os._exit, CRASH_EXIT_CODE)
            return
        if self._crash_task is None or self._crash_task.done():
            self._crash_task = asyncio.get_running_loop().create_task(self._crash_later())

    async def _crash_later(self) -> None:
        await asyncio.sleep(0.02)
        await self.crash()

    async def restart(self) -> str:
        """Come back on the same port with fresh state (nothing loaded, zero stats),
        as a restarted Ollama would. Faults are kept unless cleared."""
        await self.stop()
        self.engine = Engine(self.config, on_crash=self.crash_soon)
        return await self.start()

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
