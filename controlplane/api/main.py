"""The admin API app: `create_app(plane, token)`.

`plane` is a ControlPlane (controlplane.agent): a live agent's, or one built
over a Store with Enforcer(None) in tests. Errors a caller can cause map to
one status each, with a message that names what was wrong:

    ValueError, PolicyError, request validation   422
    DecisionNotFound, ModelNotFound, PromotionError 404 / 409
    StoreError                                     503 (the database is unwritable)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controlplane.agent import ControlPlane
from controlplane.api.routes import (
    clients,
    decisions,
    detach,
    events,
    feedback,
    health,
    metrics,
    models,
    policy,
    stats,
)
from controlplane.learning import LearningError
from controlplane.models.persist import ModelLoadError
from controlplane.store import DecisionNotFound, ModelNotFound, StoreError
from sensor.errors import PolicyError


def _error(status: int, message: str, detail: Any = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content=jsonable_encoder({"message": message, "detail": detail or message}),
    )


def _describe(errors: list[Any]) -> str:
    """ "body.ttl_s: Value error, ttl_s must be > 0 ... (got -1)" for each error."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
    return "; ".join(parts)


def create_app(plane: ControlPlane, token: str) -> FastAPI:
    app = FastAPI(
        title="botwall admin API",
        version="1",
        description="Clients, decisions, policy, feedback and models of a botwall agent.",
    )
    app.state.plane = plane
    app.state.token = token

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        for err in errors:
            err.pop("ctx", None)  # may hold the exception object: not JSON
            err.pop("url", None)
        return _error(422, _describe(errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(PolicyError)
    async def _bad_policy(_req: Request, exc: PolicyError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ValueError)
    async def _bad_value(_req: Request, exc: ValueError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(DecisionNotFound)
    @app.exception_handler(ModelNotFound)
    async def _not_found(_req: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(LearningError)
    @app.exception_handler(ModelLoadError)
    async def _conflict(_req: Request, exc: Exception) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(StoreError)
    async def _store(_req: Request, exc: StoreError) -> JSONResponse:
        return _error(503, f"store unavailable: {exc}")

    routers = (health, stats, clients, decisions, policy, feedback, events, models, metrics, detach)
    for module in routers:
        app.include_router(module.router)
    return app
