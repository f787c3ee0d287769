"""Request and response bodies. Input is validated here, so bad input is a 422
that names the field and the value before anything reaches the store."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controlplane.store import MAX_TTL_S, canonical_ja4

DecisionAction = Literal["block", "allow", "throttle", "tarpit"]
Label = Literal["bot", "human", "good_bot"]
SubjectKind = Literal["addr", "cidr", "ja4", "cluster"]
AppEventKind = Literal["login_success", "login_failure", "otp_sent", "checkout", "add_to_cart"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_line(value: str, field: str) -> str:
    text = value.strip()
    if not text or any(c in text for c in "\r\n\x00"):
        raise ValueError(f"{field} must be one non-empty line, got {value!r}")
    return text


def check_target(value: str) -> str:
    """An address, a CIDR, or a JA4 (optionally "@address-or-CIDR" scoped)."""
    text = value.strip()
    if "_" in text:
        return canonical_ja4(text)  # ValueError names the bad JA4
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"target {value!r} is not an IP address, a CIDR or a JA4") from None


class DecisionIn(_Strict):
    action: DecisionAction
    target: str = Field(max_length=200, description="an address, a CIDR or a JA4")
    ttl_s: float = Field(3600.0, description=f"seconds, > 0 and <= {MAX_TTL_S:.0f}")
    reason: str = Field("manual", max_length=500)
    throttle_connections_per_s: float = Field(0.0, ge=0, le=1e6)
    throttle_packets_per_s: float = Field(0.0, ge=0, le=1e9)
    tarpit_syns: int = Field(0, ge=0, le=6)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return check_target(value)

    @field_validator("ttl_s")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not (0 < value <= MAX_TTL_S):  # NaN fails too
            raise ValueError(f"ttl_s must be > 0 and <= {MAX_TTL_S:.0f} seconds, got {value!r}")
        return value

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        return _one_line(value, "reason")


class FeedbackIn(_Strict):
    subject_kind: SubjectKind = "addr"
    subject: str = Field(max_length=200, description="address, CIDR, JA4 or cluster key")
    label: Label
    note: str | None = Field(None, max_length=500)

    @model_validator(mode="after")
    def _subject(self) -> FeedbackIn:
        s = self.subject.strip()
        try:
            if self.subject_kind == "addr":
                ipaddress.ip_address(s)
            elif self.subject_kind == "cidr":
                ipaddress.ip_network(s, strict=False)
            elif self.subject_kind == "ja4":
                if "@" in s:
                    raise ValueError
                canonical_ja4(s)
            else:
                _one_line(s, "subject")
        except ValueError:
            raise ValueError(
                f"subject {self.subject!r} is not a valid {self.subject_kind}"
            ) from None
        if self.note is not None and any(c in self.note for c in "\r\n\x00"):
            raise ValueError(f"note must be one line, got {self.note!r}")
        return self


class AppEventIn(_Strict):
    client: str = Field(max_length=64, description="the client's IP address")
    port: int = Field(ge=1, le=65535, description="the client's source port")
    kind: AppEventKind

    @field_validator("client")
    @classmethod
    def _client(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"client {value!r} is not an IP address") from None


class Health(BaseModel):
    status: Literal["ok"]
    enforcing: bool
    uptime_s: float


class Accepted(BaseModel):
    accepted: bool


class PolicyOut(BaseModel):
    toml: str


DecisionOut = dict[str, Any]
