"""`/healthz` (liveness), `/readyz` (readiness) and `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from vlltr.service.schemas import Health, Readiness, ReadyChecks

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 while the process serves HTTP."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "not ready: see which check fails"}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 once the bundle is loaded, every batch shape is warmed, the class table is loaded and the
    inference loop is alive; 503 (with the failing checks) otherwise."""
    core = getattr(request.app.state, "core", None)
    if core is None:
        checks = ReadyChecks(
            bundle_loaded=False, sessions_warmed=False, class_table_loaded=False, inference_loop_alive=False
        )
        body = Readiness(ready=False, checks=checks)
    else:
        ready, version = core.readiness()
        checks = ReadyChecks(**ready)
        body = Readiness(
            ready=all(checks.model_dump().values()),
            checks=checks,
            bundle_id=core.bundle.bundle_id,
            class_table_version=version,
        )
    headers = {} if body.ready else {"Retry-After": str(request.app.state.settings.retry_after_s)}
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503, headers=headers)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}},
)
async def metrics(request: Request) -> Response:
    """The service's metrics in the Prometheus text format."""
    data, content_type = request.app.state.metrics.exposition()
    return Response(content=data, media_type=content_type)
