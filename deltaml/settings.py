"""One configuration object: flags and ``DELTAML_*`` environment variables share names."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from decimal import Decimal

from pydantic import BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .protocol.fees import GWEI, MAX_FEE, MAX_TIP

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS = get_args(LogLevel)


class ConfigError(ValueError):
    """Flags or settings a job cannot run with, named as the command line spells them."""


class Settings(BaseSettings):
    """Defaults for every command; ``DELTAML_AMQP_URL`` sets ``--amqp-url`` and so on."""

    model_config = SettingsConfigDict(env_prefix="DELTAML_")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    log_format: Literal["console", "json"] = "console"
    log_level: Annotated[LogLevel, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"
    bus: Literal["amqp", "memory"] = "amqp"
    chain: str = "embedded"
    key_bits: int = 2048
    precompute: bool = True
    workers: int = 0  # the aggregator's and the buyer's processes for per-model work; 0: one per core
    max_fee_gwei: Decimal = Decimal(MAX_FEE) / GWEI  # the most a party signs for per gas (chain.party)
    max_tip_gwei: Decimal = Decimal(MAX_TIP) / GWEI
    escrow: str | None = None  # the only escrow contract, and chain, a party signs for
    chain_id: int | None = None

    @classmethod
    def from_environment(cls) -> "Settings":
        """The settings, or a :class:`ConfigError` naming the first variable that cannot be used."""
        try:
            return cls()
        except ValidationError as exc:
            error = exc.errors()[0]
            name = "DELTAML_" + str(error["loc"][0]).upper()
            raise ConfigError(f"{name}={error.get('input')!s}: {error['msg'][0].lower()}{error['msg'][1:]}") from None
