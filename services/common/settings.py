"""The settings base class: every environment variable is declared once, under ``LIVEAVATAR_``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class LiveAvatarSettings(BaseSettings):
    """Base for every service's settings. Subclasses add their own fields.

    Values come from ``LIVEAVATAR_<FIELD>`` environment variables (case-insensitive) or keyword
    arguments. Secrets are ``SecretStr`` so they print as ``**********``.
    """

    model_config = SettingsConfigDict(env_prefix="LIVEAVATAR_", extra="forbid", frozen=True)

    log_level: str = Field("INFO", description="root log level")
    json_logs: bool = Field(True, description="one JSON object per log line (services); the CLI turns it off")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), description="Redis URL (may hold a password)")

    def log_safe(self) -> dict:
        """The effective settings for the one start-up log line; secrets stay masked."""
        return {k: (str(v) if isinstance(v, SecretStr) else v) for k, v in self.model_dump().items()}
