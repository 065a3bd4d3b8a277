"""The settings base class: every environment variable is declared once, under ``LIVEAVATAR_``.

The connection settings every service shares live here: the Kafka bootstrap servers with the Kafka
security settings (PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL with PLAIN or SCRAM), and the Redis URL
with an optional CA bundle for ``rediss://``. Services never build a Kafka or Redis client from the bare
address: they call :meth:`LiveAvatarSettings.kafka` and :meth:`LiveAvatarSettings.redis_options`, so the
security settings reach every producer, consumer and admin client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.kafka import KafkaConnection

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class LiveAvatarSettings(BaseSettings):
    """Base for every service's settings. Subclasses add their own fields.

    Values come from ``LIVEAVATAR_<FIELD>`` environment variables (case-insensitive) or keyword
    arguments. Secrets are ``SecretStr`` so they print as ``**********``.
    """

    model_config = SettingsConfigDict(env_prefix="LIVEAVATAR_", extra="forbid", frozen=True)

    log_level: str = Field("INFO", description="root log level")
    json_logs: bool = Field(True, description="one JSON object per log line (services); the CLI turns it off")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT", description="Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: KafkaSaslMechanism | None = Field(
        None, description="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512); required by the SASL_* protocols")
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (a secret)")
    kafka_ssl_cafile: str | None = Field(None, description="PEM CA bundle of the brokers (SSL, SASL_SSL); "
                                                           "unset: the system's CAs")
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"),
                                 description="Redis URL (may hold a password; rediss:// for TLS)")
    redis_ssl_cafile: str | None = Field(None, description="PEM CA bundle of the Redis server (rediss:// only)")

    @model_validator(mode="after")
    def _check_connections(self) -> LiveAvatarSettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl:
            missing = [name for name, value in (("KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                                                ("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                                                ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password)) if not value]
            if missing:
                raise ValueError(f"LIVEAVATAR_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                                 + ", ".join(f"LIVEAVATAR_{m}" for m in missing))
        elif self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password:
            raise ValueError("Kafka SASL settings are set but LIVEAVATAR_KAFKA_SECURITY_PROTOCOL is "
                             f"{self.kafka_security_protocol}; use SASL_SSL or SASL_PLAINTEXT")
        if self.kafka_ssl_cafile:
            if not self.kafka_security_protocol.endswith("SSL"):
                raise ValueError("LIVEAVATAR_KAFKA_SSL_CAFILE is set but LIVEAVATAR_KAFKA_SECURITY_PROTOCOL is "
                                 f"{self.kafka_security_protocol}; use SSL or SASL_SSL")
            if not Path(self.kafka_ssl_cafile).is_file():
                raise ValueError(f"LIVEAVATAR_KAFKA_SSL_CAFILE: no such file: {self.kafka_ssl_cafile}")
        if self.redis_ssl_cafile:
            if not self.redis_url.get_secret_value().startswith("rediss://"):
                raise ValueError("LIVEAVATAR_REDIS_SSL_CAFILE is set but LIVEAVATAR_REDIS_URL is not rediss://")
            if not Path(self.redis_ssl_cafile).is_file():
                raise ValueError(f"LIVEAVATAR_REDIS_SSL_CAFILE: no such file: {self.redis_ssl_cafile}")
        return self

    def kafka(self) -> KafkaConnection:
        """How to reach Kafka: bootstrap servers plus security, for every producer, consumer and admin."""
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        return KafkaConnection(self.kafka_bootstrap, self.kafka_security_protocol, self.kafka_sasl_mechanism,
                               self.kafka_sasl_username, password, self.kafka_ssl_cafile)

    def redis_options(self) -> dict:
        """Keyword arguments for ``StateStore.from_url`` besides the URL (the TLS CA bundle)."""
        return {"ssl_ca_certs": self.redis_ssl_cafile} if self.redis_ssl_cafile else {}

    def log_safe(self) -> dict:
        """The effective settings for the one start-up log line; secrets stay masked."""
        return {k: (str(v) if isinstance(v, SecretStr) else v) for k, v in self.model_dump().items()}
