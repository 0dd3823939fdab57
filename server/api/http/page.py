"""The playground's routes: its page at / and its static files under /playground/, from the package folder
`playground/` (plain HTML, CSS and JavaScript; no build step, nothing fetched from elsewhere). The page
talks to the server only through the public HTTP API (server/api/http/routes.py)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

FOLDER = Path(__file__).with_name("playground")
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
"""The page may load and call only this server: no CDN, no third-party script."""


async def index(request: HttpRequest) -> Response:
    return FileResponse(FOLDER / "index.html", headers={"content-security-policy": CONTENT_SECURITY_POLICY,
                                                        "x-content-type-options": "nosniff"})


def playground_routes() -> list[BaseRoute]:
    """GET / (the page) and GET /playground/FILE (its stylesheet and script, with their content types)."""
    return [Route("/", index), Mount("/playground", StaticFiles(directory=FOLDER), name="playground")]
