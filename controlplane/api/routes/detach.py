"""POST /v1/detach: the agent takes its programs off its interfaces and stops.

What `botwall detach` asks a running agent. Unless keep_verdicts, the pinned
verdict maps go too, so nothing of botwall is left in the kernel. The agent
answers first and detaches right after, from its own loop: 202.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from controlplane.api.deps import AgentDep, AuthDep

router = APIRouter(prefix="/v1", tags=["agent"])


@router.post("/detach", status_code=202)
def detach(plane: AgentDep, actor: AuthDep, keep_verdicts: bool = False) -> dict[str, Any]:
    if not plane.request_detach(actor, keep_verdicts=keep_verdicts):
        raise HTTPException(409, "this admin API runs without a sensor: nothing to detach")
    return {"detaching": True, "keep_verdicts": keep_verdicts}
