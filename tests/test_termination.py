"""Early-termination decisions on recorded metric curves (no Ray trials run)."""

from __future__ import annotations

from models.sweep.settings import EarlyTermination
from models.sweep.termination import BanditPolicy, TruncationPolicy, applies


def _replay(policy, curves: dict[str, list[float]]) -> dict[str, int | None]:
    """Feed curves interval by interval (trials interleaved); → the interval each trial was stopped at."""
    stopped: dict[str, int | None] = {t: None for t in curves}
    for interval in range(1, max(len(c) for c in curves.values()) + 1):
        for trial, curve in curves.items():
            if stopped[trial] is None and interval <= len(curve) and policy.decide(trial, interval,
                                                                                   curve[interval - 1]):
                stopped[trial] = interval
            if interval == len(curve) and hasattr(policy, "finish"):
                policy.finish(trial)
    return stopped


def test_policy_applies_from_the_delay_at_every_evaluation_interval():
    policy = EarlyTermination("bandit", evaluation_interval=2, delay_evaluation=3, slack_factor=0.1)
    assert [i for i in range(1, 9) if applies(policy, i)] == [4, 6, 8]


def test_bandit_slack_factor_stops_a_trial_below_best_over_one_plus_slack():
    policy = BanditPolicy(EarlyTermination("bandit", evaluation_interval=1, delay_evaluation=2, slack_factor=0.2))
    curves = {"good": [0.5, 0.7, 0.8, 0.9], "close": [0.5, 0.6, 0.7, 0.8], "bad": [0.1, 0.4, 0.5, 0.6]}
    # interval 2: best 0.7 → threshold 0.583: bad (0.4) stops, close (0.6) stays; interval 1 is in the delay
    assert _replay(policy, curves) == {"good": None, "close": None, "bad": 2}


def test_bandit_slack_amount_and_evaluation_interval():
    policy = BanditPolicy(EarlyTermination("bandit", evaluation_interval=2, delay_evaluation=0, slack_amount=0.15))
    curves = {"a": [0.5, 0.8, 0.9], "b": [0.2, 0.7, 0.6], "c": [0.6, 0.6, 0.9]}
    # interval 1 not evaluated (interval 2 only); at 2: best 0.8, threshold 0.65 → c (0.6) stops, b (0.7) stays
    assert _replay(policy, curves) == {"a": None, "b": None, "c": 2}


def test_bandit_compares_with_the_best_reported_up_to_the_same_interval():
    policy = BanditPolicy(EarlyTermination("bandit", slack_factor=0.1))
    assert not policy.decide("late", 1, 0.5)  # alone so far
    for i, v in enumerate([0.5, 0.95, 0.99], start=1):
        policy.decide("fast", i, v)
    assert not policy.decide("late", 1, 0.5) and policy.best_until(1) == 0.5
    assert policy.decide("late", 2, 0.6)  # best by interval 2 is 0.95 → threshold 0.864


def test_truncation_selection_cancels_the_lowest_percentage_at_each_interval():
    policy = TruncationPolicy(EarlyTermination("truncation_selection", evaluation_interval=1, delay_evaluation=1,
                                               truncation_percentage=50))
    curves = {"a": [0.9, 0.9, 0.95], "b": [0.5, 0.8, 0.9], "c": [0.7, 0.6, 0.7]}
    # decisions use the values reported so far at that interval. Interval 1: a alone → on; b vs a: 2 values,
    # floor(2 * 0.5) = 1 lowest → b stops; c vs a, b: floor(1.5) = 1 lowest is b → c goes on.
    # Interval 2: a alone (b stopped, not finished) → on; c (0.6) vs a (0.9) → c stops.
    assert _replay(policy, curves) == {"a": None, "b": 1, "c": 2}


def test_truncation_counts_finished_trials_unless_excluded():
    def run(exclude: bool) -> bool:
        policy = TruncationPolicy(EarlyTermination("truncation_selection", truncation_percentage=50,
                                                   exclude_finished_jobs=exclude))
        for i, v in enumerate([0.9, 0.9], start=1):
            policy.decide("done", i, v)
        policy.finish("done")
        policy.decide("slow", 1, 0.5)
        return policy.decide("slow", 3, 0.6)  # the finished trial's last value (0.9) counts at interval 3

    assert run(exclude=False) is True
    assert run(exclude=True) is False


def test_each_policy_maps_to_a_tune_scheduler():
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule

    from models.sweep.termination import make_scheduler

    median = make_scheduler(EarlyTermination("median_stopping", evaluation_interval=2, delay_evaluation=3), "iou")
    assert isinstance(median, MedianStoppingRule) and median._grace_period == 3 and median.interval == 2
    assert median.set_search_properties("iou", "max")  # Tune hands the metric over; refused if set twice
    assert make_scheduler(EarlyTermination("bandit", slack_amount=0.1), "iou").policy.__class__ is BanditPolicy
    assert make_scheduler(EarlyTermination("truncation_selection", truncation_percentage=10),
                          "iou").policy.__class__ is TruncationPolicy
    assert type(make_scheduler(None, "iou")) is FIFOScheduler
