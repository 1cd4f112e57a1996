"""HTTP routers, one module per resource, assembled by `api_router`."""

from fastapi import APIRouter

from vlltr.service.api import classes, classify, health, model, page

api_router = APIRouter()
api_router.include_router(classify.router)
api_router.include_router(classes.router)
api_router.include_router(model.router)
api_router.include_router(health.router)
api_router.include_router(page.router)

__all__ = ["api_router"]
