"""The hub's memory budget as a policy (serving.hub.memory), without Ray: what goes when a load would pass the
budget. tests/test_hub.py has it at work on a real hub over HTTP."""

from __future__ import annotations

from serving.hub.memory import MB, ModelMemory


def _load(memory: ModelMemory, name: str, mb: float, seconds: float):
    resident = memory.resident(name)
    return resident, memory.admit(resident, object(), int(mb * MB), seconds)


def test_one_large_detector_does_not_push_out_ten_small_classifiers():
    memory = ModelMemory(100 * MB)
    classifiers = [_load(memory, f"classifier-{i}", 5, 0.5)[0] for i in range(10)]
    detector, evicted = _load(memory, "detector", 60, 1.0)
    assert evicted == ["classifier-0", "classifier-1"]  # just enough room made, the least recently called first
    assert classifiers[0].model is None and detector.model is not None  # (looked at, not called)
    again, evicted = _load(memory, "classifier-0", 5, 0.5)
    assert evicted == ["detector"]  # cheap to reload for its size: it goes, not another classifier
    assert memory.used() == 45 * MB and memory.use(again) is not None


def test_a_recently_called_model_stays_and_one_slow_to_load_is_kept_longer():
    memory = ModelMemory(25 * MB)  # two models of 10 MB
    a, _ = _load(memory, "a", 10, 1.0)
    _load(memory, "b", 10, 1.0)
    memory.use(a)
    assert _load(memory, "c", 10, 1.0)[1] == ["b"]  # a, called after b, stays
    slow, evicted = _load(memory, "slow", 10, 20.0)
    assert evicted == ["a"]
    assert _load(memory, "d", 10, 1.0)[1] == ["c"]  # not slow, loaded before d
    assert _load(memory, "e", 10, 1.0)[1] == ["d"]  # slow, never called since its load, still stays
    assert slow.model is not None


def test_a_model_larger_than_the_budget_is_served_alone_and_no_budget_keeps_all():
    memory = ModelMemory(10 * MB)
    _load(memory, "small", 5, 1.0)
    big, evicted = _load(memory, "big", 50, 1.0)
    assert evicted == ["small"] and memory.use(big) is not None
    unbounded = ModelMemory(None)
    for i in range(5):
        assert _load(unbounded, str(i), 1000, 1.0)[1] == []
    view = unbounded.view()
    assert view["budget_mb"] is None and view["used_mb"] == 5000 and len(view["models"]) == 5
    assert set(view["models"][0]) == {"model", "footprint_mb", "load_s", "idle_s"}


def test_a_model_the_count_cap_evicted_gives_its_memory_back_but_not_a_newer_load_of_it():
    memory = ModelMemory(100 * MB)
    old, _ = _load(memory, "m", 40, 1.0)
    old.__del__()  # what Ray Serve's multiplexer calls when its count cap evicts a model
    assert memory.used() == 0 and old.model is None
    new, _ = _load(memory, "m", 40, 1.0)
    old.__del__()  # the old resident collected later: the new one stays
    assert memory.used() == 40 * MB and memory.use(new) is not None
