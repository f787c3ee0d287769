"""GET /healthz: no auth, so a load balancer or systemd can probe it."""

from __future__ import annotations

import time

from fastapi import APIRouter

from controlplane.api.deps import AgentDep
from controlplane.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(plane: AgentDep) -> Health:
    return Health(
        status="ok", enforcing=plane.enforcer.enforcing, uptime_s=time.time() - plane.started_at
    )
