"""A small typed client for the agent's admin API (what `botwall` commands talk to).

The agent (`botwall run`) serves the admin API on 127.0.0.1:9440 with a bearer
token it writes to {state-dir}/admin.token. This module finds the URL and the
token the way an operator expects (flag, then environment, then the default),
makes the request, and turns every failure a user can meet (agent down, token
refused, bad input) into one ApiError whose message is fit to print as is, so
the CLI never shows a traceback for them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_API = "http://127.0.0.1:9440"
DEFAULT_STATE_DIR = "/var/lib/botwall"
TOKEN_FILE = "admin.token"
# Every admin call is a small local request; a longer wait means something is wrong.
# Retraining can take a while, so it gets its own, longer timeout.
TIMEOUT_S = 10.0
RETRAIN_TIMEOUT_S = 300.0


class ApiError(Exception):
    """A failed admin API call; str() is one line for the operator."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """Where the admin API is and the token it takes (None: none was found)."""

    url: str
    token: str | None
    token_source: str  # for messages: "--token", "BOTWALL_TOKEN" or the file's path


def discover(
    api: str | None = None, token: str | None = None, state_dir: str | Path | None = None
) -> Endpoint:
    """The admin API's URL and token: explicit values first, then BOTWALL_API /
    BOTWALL_TOKEN, then the default URL and {state-dir}/admin.token.

    An unreadable token file is not an error here: the agent may not need the
    token (/healthz), and if it does, its 401 is reported with where we looked."""
    url = (api or os.environ.get("BOTWALL_API") or DEFAULT_API).rstrip("/")
    if token:
        return Endpoint(url, token.strip(), "--token")
    env_token = os.environ.get("BOTWALL_TOKEN")
    if env_token:
        return Endpoint(url, env_token.strip(), "BOTWALL_TOKEN")
    directory = Path(state_dir or os.environ.get("BOTWALL_STATE_DIR") or DEFAULT_STATE_DIR)
    path = directory / TOKEN_FILE
    try:
        found = path.read_text(encoding="utf-8").strip() or None
    except OSError:
        found = None
    return Endpoint(url, found, str(path))


class AdminClient:
    """One method per admin API route used by the CLI; each returns decoded JSON."""

    def __init__(self, endpoint: Endpoint, transport: httpx.BaseTransport | None = None) -> None:
        self.endpoint = endpoint
        headers = {"Accept": "application/json"}
        if endpoint.token:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        self._http = httpx.Client(
            base_url=endpoint.url, headers=headers, timeout=TIMEOUT_S, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- routes ----

    def health(self) -> Any:
        return self._call("GET", "/healthz")

    def stats(self) -> Any:
        return self._call("GET", "/v1/stats")

    def clients(self, limit: int, sort: str = "risk") -> Any:
        return self._call("GET", "/v1/clients", params={"sort": sort, "limit": limit})

    def client(self, addr: str) -> Any:
        return self._call("GET", f"/v1/clients/{_segment(addr)}")

    def clusters(self) -> Any:
        return self._call("GET", "/v1/clusters")

    def decisions(self) -> Any:
        return self._call("GET", "/v1/decisions")

    def add_decision(self, action: str, target: str, ttl_s: float | None, reason: str) -> Any:
        body: dict[str, Any] = {"action": action, "target": target, "reason": reason}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._call("POST", "/v1/decisions", json=body)

    def delete_decision(self, decision_id: str) -> Any:
        return self._call("DELETE", f"/v1/decisions/{_segment(decision_id)}")

    def policy(self) -> str:
        """The running policy as TOML text."""
        response = self._send("GET", "/v1/policy", headers={"Accept": "application/toml, */*"})
        if "json" in response.headers.get("content-type", ""):
            # A JSON wrapper around the text is as good as the text itself.
            data = _json(response)
            if isinstance(data, dict):
                for key in ("toml", "text", "policy"):
                    if isinstance(data.get(key), str):
                        return str(data[key])
            if isinstance(data, str):
                return data
        return response.text

    def set_policy(self, text: str) -> Any:
        return self._call(
            "PUT",
            "/v1/policy",
            content=text.encode("utf-8"),
            headers={"Content-Type": "application/toml"},
        )

    def models(self) -> Any:
        return self._call("GET", "/v1/models")

    def retrain(self) -> Any:
        return self._call("POST", "/v1/models/retrain", timeout=RETRAIN_TIMEOUT_S)

    def promote(self, version: str) -> Any:
        return self._call("POST", f"/v1/models/{_segment(version)}/promote")

    def detach(self, keep_verdicts: bool) -> Any:
        return self._call(
            "POST", "/v1/detach", params={"keep_verdicts": "true" if keep_verdicts else "false"}
        )

    def running(self) -> bool:
        """Whether an agent answers at the endpoint (its /healthz)."""
        try:
            self._http.get("/healthz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return True

    # ---- plumbing ----

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if not response.content:
            return None
        if "json" not in response.headers.get("content-type", "application/json"):
            return response.text
        return _json(response)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.endpoint.url
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ApiError(
                f"botwall agent is not running at {url} (start it with botwall run)"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(f"the botwall agent at {url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot talk to the botwall agent at {url}: {exc}") from None
        if response.status_code == 401:
            if self.endpoint.token is None:
                raise ApiError(
                    "the admin API needs a token and none was found: pass --token, set "
                    f"BOTWALL_TOKEN, or make {self.endpoint.token_source} readable",
                    401,
                )
            raise ApiError(
                f"the admin token was refused (token from {self.endpoint.token_source})", 401
            )
        if response.status_code >= 400:
            raise ApiError(_error_text(response), response.status_code)
        return response


def _segment(value: str) -> str:
    """One path segment: a CIDR's slash or an IPv6 colon must not split the path."""
    return quote(value, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ApiError(
            f"the agent sent a reply that is not JSON ({response.request.url.path})"
        ) from None


def _error_text(response: httpx.Response) -> str:
    """The server's own words for an error: the agent's {"message": ...}, or
    FastAPI's {"detail": ...} in either of its forms (a string, or a list of
    validation errors), else the body's first line."""
    detail: Any = None
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        if isinstance(body.get("message"), str):
            return str(body["message"])
        detail = body.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and detail:
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg", item))
                parts.append(f"{where}: {msg}" if where else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    body = response.text.strip()
    if body:
        return body.splitlines()[0][:300]
    return f"the agent answered {response.status_code} {response.reason_phrase}"
