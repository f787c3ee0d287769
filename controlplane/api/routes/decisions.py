"""Decisions: list, make by hand, revoke. The store first, then the kernel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status

from controlplane.api.deps import AgentDep, AuthDep
from controlplane.api.schemas import DecisionIn

router = APIRouter(prefix="/v1", tags=["decisions"])


@router.get("/decisions")
def list_decisions(
    plane: AgentDep,
    _actor: AuthDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    include_expired: bool = False,
    include_revoked: bool = False,
) -> list[dict[str, Any]]:
    return [r.as_dict() for r in plane.decisions(limit, include_expired, include_revoked)]


@router.post("/decisions", status_code=status.HTTP_201_CREATED)
def add_decision(body: DecisionIn, plane: AgentDep, actor: AuthDep) -> dict[str, Any]:
    record = plane.add_decision(
        body.action,
        body.target,
        body.ttl_s,
        body.reason,
        actor,
        throttle_connections_per_s=body.throttle_connections_per_s,
        throttle_packets_per_s=body.throttle_packets_per_s,
        tarpit_syns=body.tarpit_syns,
    )
    return record.as_dict()


@router.delete("/decisions/{decision_id}")
def revoke_decision(
    plane: AgentDep, actor: AuthDep, decision_id: Annotated[str, Path(max_length=64)]
) -> dict[str, Any]:
    return plane.revoke(decision_id, actor, "revoked through the admin API").as_dict()
