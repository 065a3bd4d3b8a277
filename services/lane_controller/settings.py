"""Settings of the lane controller (``LIVEAVATAR_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import LiveAvatarSettings

#: Label every lane-pool LeaderWorkerSet carries (value: the pool name).
POOL_LABEL = "liveavatar.io/lane-pool"


class LaneControllerSettings(LiveAvatarSettings):
    """What the lane controller reads from its environment.

    ``LIVEAVATAR_NAMESPACE`` (empty: the pod's own namespace, else ``default``), ``LIVEAVATAR_INTERVAL_S``,
    ``LIVEAVATAR_SCALE_DOWN_IDLE_S``, ``LIVEAVATAR_HEADROOM``, ``LIVEAVATAR_REDIS_URL`` and the others below.
    """

    namespace: str = Field("", description="namespace of the lane pools' LeaderWorkerSets; empty: the pod's namespace")
    interval_s: float = Field(5.0, gt=0, description="seconds between two reconcile passes")
    scale_down_idle_s: float = Field(300.0, ge=0, description="demand must stay below the lane count this long "
                                                               "before lanes are drained and removed")
    headroom: int = Field(0, ge=0, description="idle lanes kept beyond the demand (still within the pool's max)")
    label_selector: str = Field(POOL_LABEL, min_length=1,
                                description="Kubernetes label selector of the LeaderWorkerSets this controller scales")
    kubeconfig: str | None = Field(None, description="kubeconfig file; unset: in-cluster config, else ~/.kube/config")
    request_timeout_s: float = Field(10.0, gt=0, description="timeout of one Kubernetes API call")
    redis_namespace: str = Field("la", description="prefix of every Redis key")
    health_host: str = Field("127.0.0.1", description="address of /healthz, /readyz, /metrics (0.0.0.0 in a pod)")
    health_port: int = Field(8080, ge=0, le=65535, description="port of /healthz, /readyz, /metrics (0: any free port)")
