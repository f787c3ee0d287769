"""GET /v1/stats: kernel and engine counters, decision latency, events lost."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from controlplane.api.deps import AgentDep, AuthDep

router = APIRouter(prefix="/v1", tags=["stats"])


@router.get("/stats")
def stats(plane: AgentDep, _actor: AuthDep) -> dict[str, Any]:
    return _json_safe(plane.stats())


def _json_safe(value: Any) -> Any:
    """NaN (no events yet) is not JSON: it becomes null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
