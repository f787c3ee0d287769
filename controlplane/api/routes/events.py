"""POST /v1/events: the application's word about a client connection."""

from __future__ import annotations

from fastapi import APIRouter, status

from controlplane.api.deps import AgentDep, AuthDep
from controlplane.api.schemas import Accepted, AppEventIn

router = APIRouter(prefix="/v1", tags=["events"])


@router.post("/events", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted)
def app_event(body: AppEventIn, plane: AgentDep, _actor: AuthDep) -> Accepted:
    plane.app_event(body.client, body.port, body.kind)
    return Accepted(accepted=True)
