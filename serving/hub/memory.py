"""The models one hub replica keeps, within a memory budget (`--model-memory-mb`).

Ray Serve's multiplexer routes requests to the replicas that hold a model and caps how many each holds (by count,
least recently used first). What it holds for a model id is a `Resident`: the loaded model while the budget keeps
it. When a load would take the replica past its budget, the least valuable other residents give their models
up (their ids stay with Ray Serve, whose routing still sends them here; their next call loads them again).

Which go first: GreedyDual-Size (Cao and Irani, 1997). Each resident has a credit, set on every call to the
clock plus its load seconds per MB: a model slow to load for its size is costly to evict, and one called
recently has a credit from a later clock. The lowest credit goes first (of equal ones, the least recently
called) and the clock moves up to it, so the credits of models that are not called fall behind. A large
detector that loads quickly for its size goes before ten small classifiers that together hold as much.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

MB = 1 << 20


@dataclass(eq=False)
class Resident:
    """A model id Ray Serve's multiplexer holds on this replica: its loaded model while the budget keeps it (None
    before its load and after an eviction), its footprint (bytes) and how long its last load took."""

    model_id: str
    memory: ModelMemory = field(repr=False)
    model: Any = None
    footprint: int = 0
    load_s: float = 0.0
    credit: float = 0.0
    used: float = field(default_factory=time.monotonic)

    def __del__(self) -> None:
        """Ray Serve's count cap evicted it (it calls `__del__`), or the replica stops: its memory given back."""
        self.memory.forget(self)


class ModelMemory:
    """The residents of one replica whose models are loaded, within `budget` bytes (None: count only)."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self._loaded: dict[str, Resident] = {}
        self._clock = 0.0
        self._lock = threading.Lock()  # Ray Serve calls `__del__` from a thread of its own

    def resident(self, model_id: str) -> Resident:
        """A new resident for `model_id`, not loaded yet."""
        return Resident(model_id, self)

    def admit(self, resident: Resident, model: Any, footprint: int, load_s: float) -> list[str]:
        """`model` loaded for `resident`; → the ids of those evicted to keep within the budget (the newcomer stays
        even alone past it: a model larger than the budget is still served, alone)."""
        resident.model, resident.footprint, resident.load_s = model, footprint, load_s
        with self._lock:
            self._loaded[resident.model_id] = resident
            self._credit(resident)
            evicted = []
            while self.budget is not None and self.used() > self.budget and len(self._loaded) > 1:
                victim = min((r for r in self._loaded.values() if r is not resident),
                             key=lambda r: (r.credit, r.used))  # of equal credits, the least recently called
                self._clock = victim.credit
                victim.model = None
                del self._loaded[victim.model_id]
                evicted.append(victim.model_id)
        return evicted

    def use(self, resident: Resident) -> Any:
        """A call of `resident`: its credit renewed; → its model, None when the budget evicted it."""
        with self._lock:
            model = resident.model
            if model is not None:
                self._credit(resident)
            return model

    def forget(self, resident: Resident) -> None:
        """`resident` no longer held (a newer resident of the same id stays)."""
        with self._lock:
            if self._loaded.get(resident.model_id) is resident:
                del self._loaded[resident.model_id]
            resident.model = None

    def used(self) -> int:
        return sum(r.footprint for r in self._loaded.values())

    def view(self) -> dict[str, Any]:
        """What GET /models shows of this replica: the budget, the bytes in use and each loaded model (most
        recently called first) with its footprint and load time."""
        with self._lock:
            loaded = sorted(self._loaded.values(), key=lambda r: r.used, reverse=True)
            now = time.monotonic()
            return {"budget_mb": None if self.budget is None else round(self.budget / MB, 1),
                    "used_mb": round(self.used() / MB, 1),
                    "models": [{"model": r.model_id, "footprint_mb": round(r.footprint / MB, 1),
                                "load_s": round(r.load_s, 3), "idle_s": round(now - r.used, 1)} for r in loaded]}

    def _credit(self, resident: Resident) -> None:
        resident.credit = self._clock + resident.load_s / max(resident.footprint / MB, 1.0)
        resident.used = time.monotonic()
