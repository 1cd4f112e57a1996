"""Dependencies shared by the routers: the serving core, the settings and the admin-token check."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vlltr.errors import NotReadyError
from vlltr.service.api.errors import ApiError
from vlltr.service.api.uploads import BodyHold
from vlltr.service.core import Classifier, ServingCore
from vlltr.service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="the admin token (`VLLTR_ADMIN_TOKEN`), when one is set")


# The dependencies on the request path are `async def`: FastAPI runs a plain `def` dependency in its
# thread pool, a thread hop per request that cost more than the whole lookup.
async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings  # set by create_app; Starlette's state is untyped
    return settings


async def get_core(request: Request) -> ServingCore:
    """The serving core; `NotReadyError` (503) while the service is still loading."""
    core: ServingCore | None = getattr(request.app.state, "core", None)
    if core is None:
        raise NotReadyError("the service is starting; try again shortly")
    return core


def classifier_of(request: Request) -> Classifier:
    """What classifies: the serving core, or in a front-end of the multi-process service its link to the
    engine; `NotReadyError` (503) while the service is still loading. Called by the classify routes
    themselves rather than through `Depends`: each dependency costs FastAPI a parameter resolution per
    request, a measurable share of a cache hit."""
    core: Classifier | None = getattr(request.app.state, "core", None)
    if core is None:
        raise NotReadyError("the service is starting; try again shortly")
    return core


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a Bearer token, 403 with a wrong one; a no-op when no admin token is configured (`async`:
    a plain `def` dependency would cost every admin request a hop to the thread pool)."""
    token = request.app.state.settings.admin_token
    if token is None:
        return
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "this endpoint needs the admin token: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode("utf-8")
    if not hmac.compare_digest(given, token.get_secret_value().encode("utf-8")):
        raise ApiError(403, "forbidden", "the admin token is not valid")


@contextlib.contextmanager
def held_body(request: Request) -> Iterator[BodyHold]:
    """This request's share of the app's request-body budget, given back when the block ends (the classify
    routes hold it around their work: cheaper than a generator dependency on the request path)."""
    hold = BodyHold(getattr(request.app.state, "body_budget", None))
    try:
        yield hold
    finally:
        hold.release()


async def body_hold(request: Request) -> AsyncIterator[BodyHold]:
    """`held_body` as a dependency: given back once the route function ends."""
    with held_body(request) as hold:
        yield hold


CoreDep = Annotated[ServingCore, Depends(get_core)]
# Released when the route function ends, before the answer is sent: a client that sends its next upload the
# moment it reads the answer must not find its own previous body still holding the budget.
BodyHoldDep = Annotated[BodyHold, Depends(body_hold, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Depends(require_admin)
