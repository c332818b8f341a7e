"""The hub's own series, exported through Ray's metrics as `visionserve serve`'s are (serving.replica; Prometheus
reads them with deploy/prometheus.yml): what Ray Serve does not already count. Requests by route and status code
and their latency are Ray Serve's series (`ray_serve_num_http_requests`, `ray_serve_http_request_latency_ms`, from
HAProxy's log in front), as are its multiplexer's loads by count (`ray_serve_multiplexed_*`); loads and
evictions by the memory budget (serving.hub.memory) happen beside Ray's multiplexer, so they are counted here,
with analyze's latency per model and the trainings queued and running. The `model` tag is the registered name
(bounded by the hub's model quota), never the version."""

from __future__ import annotations

from ray.serve import metrics

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def _name(model_id: str) -> str:
    return model_id.rsplit("/", 1)[0]


class ModelSeries:
    """A HubModels replica's: model loads (a reload after an eviction counts), evictions by the memory budget,
    seconds per load, and seconds per analyze call, each by model."""

    def __init__(self) -> None:
        self.loads = metrics.Counter("visionserve_hub_model_loads_total", "Models loaded by a hub model replica",
                                     tag_keys=("model",))
        self.evictions = metrics.Counter("visionserve_hub_model_evictions_total",
                                         "Models evicted to keep a hub model replica within its memory budget",
                                         tag_keys=("model",))
        self.load_seconds = metrics.Histogram("visionserve_hub_model_load_seconds", "Seconds per model load",
                                              boundaries=SECONDS, tag_keys=("model",))
        self.analyze_seconds = metrics.Histogram("visionserve_hub_analyze_seconds",
                                                 "Seconds per analyze call on a hub model replica",
                                                 boundaries=SECONDS, tag_keys=("model",))

    def loaded(self, model_id: str, seconds: float, evicted: list[str]) -> None:
        self.loads.inc(tags={"model": _name(model_id)})
        self.load_seconds.observe(seconds, tags={"model": _name(model_id)})
        for other in evicted:
            self.evictions.inc(tags={"model": _name(other)})

    def analyzed(self, model_id: str, seconds: float) -> None:
        self.analyze_seconds.observe(seconds, tags={"model": _name(model_id)})


class TrainingSeries:
    """The ingress's: trainings waiting for a slot and running, as the training queue changes."""

    def __init__(self) -> None:
        self.trainings = metrics.Gauge("visionserve_hub_trainings", "Hub trainings by state (queued, running)",
                                       tag_keys=("state",))

    def now(self, queued: int, running: int) -> None:
        self.trainings.set(queued, tags={"state": "queued"})
        self.trainings.set(running, tags={"state": "running"})
