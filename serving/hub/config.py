"""What a hub is started with (`visionserve hub`'s flags, serving.hub.app.build_hub), handed to its deployments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HubConfig:
    state_dir: str
    tracking_uri: str
    image_root: str | None = None
    api_key_sha256: str | None = None
    state_db: str | None = None  # the records' database URL (None: SQLite in state_dir; serving.hub.state)
    cache_size: int = 3  # models kept per HubModels replica
    model_memory_mb: float | None = None  # what their models may hold per replica (serving.hub.memory); None: count
    model_replicas: int = 1  # HubModels replicas
    ingress_replicas: int = 1  # HubService replicas (stateless: the records are the database's, the runs HubJobs')
    max_concurrent_trainings: int | None = None  # None: serving.hub.scheduler.default_slots of the cluster's CPUs
    quotas: dict[str, int] = field(default_factory=dict)  # Quotas' fields
    # custom Ray resources each training (its actor and its trials) and evaluation asks for: --training-resources
    training_resources: dict[str, float] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)  # ScoringLimits' fields: the same as `visionserve serve`'s
