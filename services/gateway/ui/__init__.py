"""The page people wait in (``/ui``): plain HTML, CSS and JavaScript shipped in the package,
no build step and nothing fetched from elsewhere (it works offline and behind strict
networks). ``index.html`` is the page, ``app.js`` its behaviour, ``style.css`` its looks.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["UI_DIR", "register"]

UI_DIR = Path(__file__).parent
#: Nothing but this origin: no inline script, no third-party anything.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


async def _file(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name", "index.html")
    path = UI_DIR / name
    if path.suffix not in _TYPES or path.parent != UI_DIR or not path.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        charset="utf-8",
        headers={
            "Content-Security-Policy": _POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def register(app: web.Application) -> None:
    app.router.add_get("/ui", _file)
    app.router.add_get("/ui/", _file)
    app.router.add_get("/ui/{name:[A-Za-z0-9_.-]+}", _file)
