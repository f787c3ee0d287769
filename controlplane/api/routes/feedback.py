"""POST /v1/feedback: label a client, a network, a JA4 or a cluster."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from controlplane.api.deps import AgentDep, AuthDep
from controlplane.api.schemas import FeedbackIn

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post("/feedback")
def feedback(body: FeedbackIn, plane: AgentDep, actor: AuthDep) -> dict[str, Any]:
    return plane.feedback(body.subject_kind, body.subject.strip(), body.label, actor, body.note)
