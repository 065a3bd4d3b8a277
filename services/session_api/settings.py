"""The session API's settings: every ``LIVEAVATAR_*`` variable it reads, declared once."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import LiveAvatarSettings


class ApiSettings(LiveAvatarSettings):
    api_host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    api_port: int = Field(8000, description="port the HTTP server listens on")
    redis_namespace: str = Field("la", description="prefix of every Redis key")
    max_upload_bytes: int = Field(10 * 2**20, description="largest image upload")
    max_image_pixels: int = Field(40_000_000, description="largest image (width x height), checked before decoding")
    max_audio_upload_bytes: int = Field(50 * 2**20, description="largest audio file upload")
    max_audio_seconds: float = Field(600.0, description="longest audio file upload")
    min_sample_rate: int = Field(8000, description="lowest accepted audio sample rate (audio WebSocket)")
    max_sample_rate: int = Field(48000, description="highest accepted audio sample rate (audio WebSocket)")
    max_queued_audio_s: float = Field(10.0, description="how far ahead of real time a client may send a session's "
                                                        "audio (429 beyond it)")
    max_backlog_audio_s: float = Field(120.0, gt=0, description="audio accepted but not yet generated, per session "
                                                                "(429 beyond it): bounds the wait while a stage "
                                                                "restarts or a lane is slower than real time")
    default_idle_timeout_s: float = Field(60.0, gt=0, le=3600,
                                          description="a session's idle_timeout_s when its options leave it out")
    default_max_duration_s: float = Field(3600.0, gt=0, le=24 * 3600,
                                          description="a session's max_duration_s when its options leave it out")
    retry_after_s: int = Field(5, description="Retry-After (seconds) of a 429 for too many sessions")
    io_threads: int = Field(16, ge=1, le=256,
                            description="threads that run the blocking Redis and Kafka calls off the event loop")
    media_buffer_blocks: int = Field(64, ge=1, description="fragments kept per session for resuming clients")
    timer_lease_s: float = Field(5.0, gt=0.5, le=300,
                                 description="lease on a session's timers: another replica takes them over this "
                                             "long after the owner died")
    event_loop_probe_s: float = Field(0.01, gt=0, le=1.0,
                                      description="period of the event-loop lag probe (liveavatar_api_event_loop_lag_seconds)")
    tts_backend: str = Field("espeak-ng", description="text-to-speech backend of POST /v1/sessions/{id}/speak: "
                                                      "espeak-ng, or none (the route answers 503)")
    tts_max_chars: int = Field(1000, ge=1, le=20000, description="longest text POST /v1/sessions/{id}/speak accepts")
    tts_timeout_s: float = Field(30.0, gt=0, le=600, description="longest one text-to-speech run may take")
