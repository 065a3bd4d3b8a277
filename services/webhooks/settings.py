"""The webhooks dispatcher's settings: every ``LIVEAVATAR_*`` variable it reads, declared once."""

from __future__ import annotations

from pydantic import Field

from services.common.worker import WorkerSettings


class WebhookSettings(WorkerSettings):
    group_id: str = Field("webhooks", description="consumer group of the events topic")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="time limit of one delivery attempt")
    webhook_max_attempts: int = Field(12, ge=1, le=50,
                                      description="attempts of one event before it goes to the dead-letter list")
    webhook_backoff_base_s: float = Field(1.0, gt=0, description="wait before the first retry; doubles each retry")
    webhook_backoff_max_s: float = Field(300.0, gt=0, description="longest wait between two attempts")
    webhook_threads: int = Field(16, ge=1, le=256, description="deliveries in flight at once")
    webhook_max_records: int = Field(64, ge=1, description="events read from the topic per batch")

    def retry_window_s(self) -> float:
        """The longest one event can take, every attempt timing out and every wait at its longest."""
        waits = sum(min(self.webhook_backoff_max_s, self.webhook_backoff_base_s * 2 ** i)
                    for i in range(self.webhook_max_attempts - 1))
        return waits + self.webhook_max_attempts * self.webhook_timeout_s
