"""`limits`, `sweep` and `search_space` of the cloud's job YAML as typed settings (training.md),
validated once; every error names its YAML key path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.errors import SettingsError
from models.sweep.search_space import Subspace, parse_search_space
from models.tasks.registry import Task

DEFAULT_TIMEOUT_MINUTES = 7 * 24 * 60
SAMPLING = ("random", "grid", "bayesian")
POLICIES = ("bandit", "median_stopping", "truncation_selection")
_LIMIT_KEYS = {"timeout_minutes", "max_trials", "max_concurrent_trials", "trial_timeout_minutes", "max_nodes",
               "enable_early_termination", "exit_score"}
_POLICY_KEYS = {"type", "evaluation_interval", "delay_evaluation", "slack_factor", "slack_amount",
                "truncation_percentage", "exclude_finished_jobs"}


@dataclass(frozen=True)
class JobLimits:
    """`limits`: trial count, concurrency (capped at max_trials) and time."""

    max_trials: int = 1
    max_concurrent_trials: int = 1
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    trial_timeout_minutes: float | None = None
    timeout_given: bool = False
    exit_score: float | None = None  # the sweep ends once a trial's primary metric reaches it
    max_nodes: int | None = None  # nodes the sweep may hold at once: caps concurrent trials × node_count_per_trial
    enable_early_termination: bool = True  # false: every trial runs to completion, whatever the sweep says


@dataclass(frozen=True)
class EarlyTermination:
    """`sweep.early_termination`: bandit, median_stopping or truncation_selection."""

    type: str
    evaluation_interval: int = 1
    delay_evaluation: int = 0
    slack_factor: float | None = None
    slack_amount: float | None = None
    truncation_percentage: int = 0
    exclude_finished_jobs: bool = False


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep needs beyond one trial's training parameters."""

    limits: JobLimits
    sampling_algorithm: str = "random"
    early_termination: EarlyTermination | None = None
    search_space: tuple[Subspace, ...] = ()
    auto_mode: bool = False

    @property
    def is_sweep(self) -> bool:
        return self.limits.max_trials > 1 or bool(self.search_space)


def _int(value: Any, key: str, low: int, high: int | None, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        problems.append(f"{key}={value!r}: must be an integer" + (f" in [{low}, {high}]" if high else f" >= {low}"))
        return None
    if value < low or (high is not None and value > high):
        problems.append(f"{key}={value!r}: must be an integer" + (f" in [{low}, {high}]" if high else f" >= {low}"))
        return None
    return int(value)


def _positive(value: Any, key: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        problems.append(f"{key}={value!r}: must be a positive number")
        return None
    return float(value)


def parse_limits(raw: Any) -> JobLimits:
    """`limits:` → JobLimits; max_concurrent_trials is capped at max_trials."""
    if raw is None:
        return JobLimits()
    if not isinstance(raw, Mapping):
        raise SettingsError(["limits: expected a mapping"], "job file")
    problems = [f"limits.{k}: unknown key" for k in sorted(set(raw) - _LIMIT_KEYS)]
    trials = _int(raw.get("max_trials", 1), "limits.max_trials", 1, 1000, problems)
    concurrent = _int(raw.get("max_concurrent_trials", 1), "limits.max_concurrent_trials", 1, 100, problems)
    timeout = raw.get("timeout_minutes")
    timeout = _positive(timeout, "limits.timeout_minutes", problems) if timeout is not None else None
    trial_timeout = raw.get("trial_timeout_minutes")
    if trial_timeout is not None:
        trial_timeout = _positive(trial_timeout, "limits.trial_timeout_minutes", problems)
    exit_score = raw.get("exit_score")
    if exit_score is not None and (isinstance(exit_score, bool) or not isinstance(exit_score, (int, float))):
        problems.append(f"limits.exit_score={exit_score!r}: must be a number (the primary metric to stop at)")
    max_nodes = raw.get("max_nodes")
    if max_nodes is not None:
        max_nodes = _int(max_nodes, "limits.max_nodes", 1, None, problems)
    enabled = raw.get("enable_early_termination", True)
    if not isinstance(enabled, bool):
        problems.append(f"limits.enable_early_termination={enabled!r}: must be true or false")
    if problems:
        raise SettingsError(problems, "job file")
    return JobLimits(trials, min(concurrent, trials), timeout or DEFAULT_TIMEOUT_MINUTES, trial_timeout,
                  timeout is not None, None if exit_score is None else float(exit_score), max_nodes, enabled)


def parse_early_termination(raw: Any, key: str = "sweep.early_termination") -> EarlyTermination | None:
    """`{type: bandit, slack_factor: 0.2, evaluation_interval: 2, delay_evaluation: 6}` → EarlyTermination."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SettingsError([f"{key}: expected a mapping with a type ({', '.join(POLICIES)})"], "job file")
    kind = str(raw.get("type", "")).lower().replace("-", "_")
    kind = {"median": "median_stopping", "truncation": "truncation_selection"}.get(kind, kind)
    if kind == "none":
        return None
    problems = [f"{key}.{k}: unknown key" for k in sorted(set(raw) - _POLICY_KEYS)]
    if kind not in POLICIES:
        problems.append(f"{key}.type={raw.get('type')!r}: must be one of {', '.join(POLICIES)}")
    interval = _int(raw.get("evaluation_interval", 1), f"{key}.evaluation_interval", 1, None, problems)
    delay = _int(raw.get("delay_evaluation", 0), f"{key}.delay_evaluation", 0, None, problems)
    factor = raw.get("slack_factor")
    amount = raw.get("slack_amount")
    percentage = raw.get("truncation_percentage")
    if kind == "bandit":
        if (factor is None) == (amount is None):
            problems.append(f"{key}: bandit needs exactly one of slack_factor or slack_amount")
        for name, value in (("slack_factor", factor), ("slack_amount", amount)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                problems.append(f"{key}.{name}={value!r}: must be a number >= 0")
    elif factor is not None or amount is not None:
        problems.append(f"{key}: slack_factor/slack_amount apply to bandit only")
    if kind == "truncation_selection":
        if percentage is None:
            problems.append(f"{key}: truncation_selection needs truncation_percentage (1-99)")
        else:
            percentage = _int(percentage, f"{key}.truncation_percentage", 1, 99, problems)
    elif percentage is not None:
        problems.append(f"{key}.truncation_percentage: applies to truncation_selection only")
    if problems:
        raise SettingsError(problems, "job file")
    return EarlyTermination(kind, interval, delay, None if factor is None else float(factor),
                            None if amount is None else float(amount), int(percentage or 0),
                            bool(raw.get("exclude_finished_jobs", False)))


def parse_sweep(doc: Mapping[str, Any], task: Task) -> SweepSettings:
    """`limits`, `sweep` and `search_space` of a job document → SweepSettings (AutoMode when max_trials > 1
    and no search space, sampling or termination is given)."""
    limits = parse_limits(doc.get("limits"))
    sweep = doc.get("sweep") or {}
    if not isinstance(sweep, Mapping):
        raise SettingsError(["sweep: expected a mapping (sampling_algorithm, early_termination)"], "job file")
    problems = [f"sweep.{k}: unknown key" for k in sorted(set(sweep) - {"sampling_algorithm", "early_termination"})]
    sampling = str(sweep.get("sampling_algorithm", "random")).lower()
    if sampling not in SAMPLING:
        problems.append(f"sweep.sampling_algorithm={sweep.get('sampling_algorithm')!r}: must be one of "
                        f"{', '.join(SAMPLING)}")
    if problems:
        raise SettingsError(problems, "job file")
    termination = parse_early_termination(sweep.get("early_termination"))
    raw_space = doc.get("search_space")
    space = parse_search_space(raw_space, task) if raw_space else ()
    auto = limits.max_trials > 1 and not space and not sweep
    if sweep and not space and limits.max_trials > 1:
        message = "search_space: missing; give a search space with sweep settings, or leave out sweep for AutoMode"
        raise SettingsError([message], "job file")
    if space and sampling == "bayesian":
        from models.sweep.search_space import tune_space

        tune_space(space)  # a conditional space or an unsupported distribution fails here, before anything runs
    if auto and termination is None:
        termination = EarlyTermination("bandit", evaluation_interval=1, delay_evaluation=5, slack_factor=0.2)
    if not limits.enable_early_termination:
        termination = None
    return SweepSettings(limits, sampling, termination, space, auto)
