"""`GET /`: the service's own page to try it on (one static HTML file: no build step, no CDN, works offline).

The page calls the public API only (`/v1/model`, `/v1/classify?explain=true`, `/v1/classes`), with relative
URLs, so it works behind a path prefix too; the admin token typed into it stays in the tab's session storage.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@functools.cache
def page_html() -> str:
    """The page, read once from the package."""
    return resources.files("vlltr.service").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    """The page: classify an image (drop, paste or pick), browse, add and delete classes."""
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})
