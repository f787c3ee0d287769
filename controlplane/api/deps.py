"""Dependencies: the control plane behind the app, and bearer-token auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controlplane.agent import ControlPlane

_bearer = HTTPBearer(auto_error=False, description="the token in {state_dir}/admin.token")


def get_plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's actor name for the audit trail; 401 without the right token."""
    expected: str = request.app.state.token
    given = credentials.credentials if credentials is not None else ""
    # Constant-time, so the comparison leaks nothing about the token.
    if credentials is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return "api:admin"


AgentDep = Annotated[ControlPlane, Depends(get_plane)]
AuthDep = Annotated[str, Depends(require_token)]
