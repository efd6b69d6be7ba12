"""The playground: a page at `/` that lists the adapters, asks about an image, a video or an audio
clip with the one picked (VQA, caption or classify, by the adapter's task), and uploads an adapter
with the token. It talks to the server through the public API only, as any client does.

Plain HTML, CSS and JavaScript in serving/playground_files/ (no build step, no framework).
Everything the page loads comes from this server: its Content-Security-Policy allows no other
origin. Routes are left out of the API schema, so /openapi.json stays the contract of the API
alone.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

FOLDER = Path(__file__).with_name("playground_files")
PAGE = "index.html"
# The assets the page loads, by name -> content type. Only these are served: no part of a URL
# reaches the file system.
ASSETS = {"playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}
# blob: for the preview of the chosen file; data: for the page's empty favicon.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _static(body: bytes, content_type: str, headers: dict[str, str]):
    async def endpoint(request: Request) -> Response:
        return Response(body, media_type=content_type, headers=headers)
    return endpoint


def add_playground_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /playground/<name> for each of ASSETS. The files are read once,
    here: they are part of the installed package (pyproject's package-data)."""
    page = (FOLDER / PAGE).read_bytes()
    app.add_route("/", _static(page, "text/html; charset=utf-8",
                               {**_HEADERS, "Content-Security-Policy": CSP}),
                  include_in_schema=False)
    for name, content_type in ASSETS.items():
        app.add_route(f"/playground/{name}", _static((FOLDER / name).read_bytes(), content_type,
                                                     _HEADERS), include_in_schema=False)
