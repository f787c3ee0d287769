"""Clients and clusters as the engine sees them now."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from controlplane.api.deps import AgentDep, AuthDep
from controlplane.api.routes.stats import _json_safe

router = APIRouter(prefix="/v1", tags=["clients"])


@router.get("/clients")
def clients(
    plane: AgentDep,
    _actor: AuthDep,
    sort: Annotated[Literal["risk", "recent", "addr"], Query()] = "risk",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
) -> list[dict[str, Any]]:
    return _json_safe(plane.clients(sort, limit))


@router.get("/clients/{addr}")
def client(
    plane: AgentDep, _actor: AuthDep, addr: Annotated[str, Path(max_length=64)]
) -> dict[str, Any]:
    found = plane.client(addr)  # ValueError (422) for what is not an address
    if found is None:
        raise HTTPException(404, detail=f"no client {addr} seen or recorded")
    return _json_safe(found)


@router.get("/clusters")
def clusters(plane: AgentDep, _actor: AuthDep) -> list[dict[str, Any]]:
    return _json_safe(plane.clusters())
