"""The policy as TOML text: read it, replace it (validated; a bad one changes nothing)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from controlplane.api.deps import AgentDep, AuthDep

router = APIRouter(prefix="/v1", tags=["policy"])

MAX_POLICY_BYTES = 1 << 20
_TOML_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/toml": {"schema": {"type": "string"}}},
    }
}


@router.get("/policy", response_class=PlainTextResponse)
def get_policy(plane: AgentDep, _actor: AuthDep) -> PlainTextResponse:
    return PlainTextResponse(plane.policy_text, media_type="application/toml")


@router.put("/policy", openapi_extra=_TOML_BODY)
async def put_policy(request: Request, plane: AgentDep, actor: AuthDep) -> dict[str, str]:
    from starlette.concurrency import run_in_threadpool

    raw = await request.body()
    if len(raw) > MAX_POLICY_BYTES:
        raise ValueError(f"policy is {len(raw)} bytes; at most {MAX_POLICY_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("policy is not UTF-8 text") from None
    # Validation and the store write block: keep them off the event loop.
    await run_in_threadpool(plane.set_policy, text, actor)
    return {"status": "applied"}
