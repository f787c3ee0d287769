"""The model registry: list, retrain now, promote a version by hand; feature drift."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from controlplane.api.deps import AgentDep, AuthDep

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def models(plane: AgentDep, _actor: AuthDep) -> list[dict[str, Any]]:
    return plane.models()


@router.get("/models/drift")
def drift(plane: AgentDep, _actor: AuthDep) -> dict[str, Any]:
    """Population stability index per feature: recent clients against the
    learning period's (or the first clients scored); empty until enough
    recent clients were scored. Levels: stable < 0.1 <= moderate <= 0.25 < major."""
    return plane.drift_report()


@router.post("/models/retrain")
def retrain(plane: AgentDep, _actor: AuthDep) -> dict[str, Any]:
    return plane.retrain()


@router.post("/models/{version}/promote")
def promote(
    plane: AgentDep, actor: AuthDep, version: Annotated[str, Path(max_length=200)]
) -> dict[str, Any]:
    return plane.promote(version, actor)
