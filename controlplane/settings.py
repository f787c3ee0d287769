"""The agent's settings: defaults < TOML config file < BOTWALL_* environment < command line.

One pydantic-settings class. The config file (/etc/botwall/botwall.toml by
convention, given with --config) holds the same keys as the class at its top
level. Lists in the environment are JSON: BOTWALL_IFACES='["eth0"]'.

Insecure combinations are refused at load, with an error that says what to
change: the admin API can block anyone, so it is never reachable beyond this
host without a token the operator chose, and a token must be long enough not
to be guessed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sensor.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/botwall/botwall.toml")
DEFAULT_STATE_DIR = Path("/var/lib/botwall")
DEFAULT_PIN_DIR = "/sys/fs/bpf/botwall"  # sensor.loader's; repeated so settings need no BCC
MIN_TOKEN_LENGTH = 32


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name could resolve to anything: treat it as public


LearnableModel = Literal["baseline", "journey"]
LEARNABLE_MODELS: tuple[LearnableModel, ...] = ("baseline", "journey")


class Settings(BaseSettings):
    """Everything `botwall run` can be told."""

    model_config = SettingsConfigDict(env_prefix="BOTWALL_", extra="forbid", toml_file=None)

    ifaces: list[str] = Field(default_factory=list)
    netns: str | None = None
    xdp_mode: Literal["auto", "native", "generic"] = "auto"
    tls_ports: list[int] = Field(default_factory=lambda: [443])
    http_ports: list[int] = Field(default_factory=list)
    pin_dir: str = DEFAULT_PIN_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    api_host: str = "127.0.0.1"
    api_port: int = Field(9440, ge=1, le=65535)
    admin_token: SecretStr | None = None
    policy_file: Path | None = None
    learning_s: float = Field(0.0, ge=0)
    # The unsupervised models fitted at the end of the learning period. The
    # baseline's 10-minute windows need a period of at least 1,200 s
    # (engine.BASELINE_MIN_LEARNING_S) to learn steady-state clients; with a
    # shorter one the engine fits the journeys only and logs why.
    learn_models: list[LearnableModel] = Field(default_factory=lambda: list(LEARNABLE_MODELS))
    score_every_s: float = Field(0.5, gt=0, le=60)
    idle_timeout_s: float = Field(30.0, gt=0)

    @field_validator("tls_ports", "http_ports")
    @classmethod
    def _ports(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not a TCP port (1-65535)")
        return ports

    @model_validator(mode="after")
    def _secure(self) -> Settings:
        token = self.admin_token.get_secret_value() if self.admin_token else None
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"admin_token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if not _loopback(self.api_host) and token is None:
            raise ValueError(
                f"api_host {self.api_host!r} is not a loopback address: binding the admin API "
                "there needs an explicitly configured admin_token (BOTWALL_ADMIN_TOKEN or "
                "admin_token in the config file)"
            )
        if not self.tls_ports and not self.http_ports:
            raise ValueError("no ports to watch: give at least one TLS or HTTP port")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command line (init) over environment over the config file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from the config file (if given), the environment and `overrides`
    (command-line values; None means "not given"). Raises ConfigError with
    every problem in one message."""
    given = {k: v for k, v in overrides.items() if v is not None}
    cls: type[Settings] = Settings
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        # The file is only known now: a subclass carries it to the TOML source.
        config_dict = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
        cls = cast(type[Settings], type("FileSettings", (Settings,), {"model_config": config_dict}))
    try:
        return cls(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"cannot read config {config}: {exc}") from None
