"""One configuration object: flags and ``DELTAML_*`` environment variables share names."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """Flags or settings a job cannot run with, named as the command line spells them."""


class Settings(BaseSettings):
    """Defaults for every command; ``DELTAML_AMQP_URL`` sets ``--amqp-url`` and so on."""

    model_config = SettingsConfigDict(env_prefix="DELTAML_")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"
    bus: Literal["amqp", "memory"] = "amqp"
    chain: str = "embedded"
    key_bits: int = 2048
    precompute: bool = True
    workers: int = 0  # the aggregator's and the buyer's processes for per-model work; 0: one per core
