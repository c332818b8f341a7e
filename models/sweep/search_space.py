"""`search_space` of the cloud's job YAML (training.md): distributions, conditional subspaces,
random and grid sampling, Ray Tune domains for bayesian search, and AutoMode's built-in space.

Distributions keep the cloud's meaning: `loguniform`/`qloguniform` take exponents
(exp(uniform(min_value, max_value))), `lognormal`/`qlognormal` are exp(normal(mu, sigma)),
`randint` draws from [0, upper), the `q` variants round to a multiple of `q`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import SettingsError
from models.tasks.architectures import get_architecture
from models.tasks.fields import aliases_of, check_value, unknown_name_message
from models.tasks.registry import Task

# type → the keys it takes (all required)
KEYS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),
    "randint": ("upper",),
    "uniform": ("min_value", "max_value"),
    "loguniform": ("min_value", "max_value"),
    "quniform": ("min_value", "max_value", "q"),
    "qloguniform": ("min_value", "max_value", "q"),
    "normal": ("mu", "sigma"),
    "lognormal": ("mu", "sigma"),
    "qnormal": ("mu", "sigma", "q"),
    "qlognormal": ("mu", "sigma", "q"),
}
BAYESIAN_TYPES = ("choice", "randint", "uniform", "loguniform", "quniform", "qloguniform")


@dataclass(frozen=True)
class Distribution:
    """One hyperparameter's distribution with the cloud's keys."""

    type: str
    values: tuple[Any, ...] = ()
    upper: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    mu: float | None = None
    sigma: float | None = None
    q: float | None = None

    def describe(self) -> str:
        """`uniform(0.1, 0.01)`: the shape used in every error message."""
        args = [getattr(self, k) for k in KEYS[self.type]]
        if self.type == "choice":
            return f"choice({', '.join(repr(v) for v in self.values)})"
        return f"{self.type}({', '.join(_num(a) for a in args)})"

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw (random sampling)."""
        t = self.type
        if t == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        if t == "randint":
            return int(rng.integers(self.upper))
        if t in ("uniform", "quniform", "loguniform", "qloguniform"):
            x = float(rng.uniform(self.min_value, self.max_value))
        else:
            x = float(rng.normal(self.mu, self.sigma))
        if t.removeprefix("q") in ("loguniform", "lognormal"):
            x = math.exp(x)
        return _round_q(x, self.q) if self.q else x

    def grid(self) -> tuple[Any, ...]:
        """Grid points: only `choice` is enumerable."""
        return self.values

    def bounds(self) -> tuple[Any, ...]:
        """The extreme values a draw can take (to check against the parameter's range), if bounded."""
        t = self.type
        if t == "choice":
            return self.values
        if t == "randint":
            return (0, self.upper - 1)
        if t in ("uniform", "quniform"):
            return (self.min_value, self.max_value)
        if t in ("loguniform", "qloguniform"):
            return (math.exp(self.min_value), math.exp(self.max_value))
        return ()

    def to_tune(self):
        """The Ray Tune domain (bayesian search); only BAYESIAN_TYPES map to a searcher's space."""
        from ray import tune

        t = self.type
        if t == "choice":
            return tune.choice(list(self.values))
        if t == "randint":
            return tune.randint(0, self.upper)
        if t == "uniform":
            return tune.uniform(self.min_value, self.max_value)
        if t == "quniform":
            return tune.quniform(self.min_value, self.max_value, self.q)
        low, high = math.exp(self.min_value), math.exp(self.max_value)
        if t == "loguniform":
            return tune.loguniform(low, high)
        if t == "qloguniform":
            return tune.qloguniform(low, high, self.q)
        raise ValueError(f"{self.describe()}: not supported by bayesian sampling")


Subspace = dict[str, Distribution]


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and float(x).is_integer() else str(x)


def _round_q(x: float, q: float) -> float:
    return round(round(x / q) * q, 12)


def parse_distribution(raw: Any, key: str) -> tuple[Distribution | None, list[str]]:
    """`{type: uniform, min_value: 0.1, max_value: 0.2}` (or a plain value: a fixed choice) → Distribution."""
    if not isinstance(raw, Mapping):
        if isinstance(raw, list):
            return None, [f"{key}: a list; write {{type: choice, values: [...]}}"]
        return Distribution("choice", (raw,)), []
    kind = str(raw.get("type", "")).lower()
    if kind not in KEYS:
        return None, [f"{key}.type: {raw.get('type')!r} is not a distribution; use one of {', '.join(KEYS)}"]
    problems = [f"{key}.{k}: unknown key for {kind} (it takes {', '.join(KEYS[kind])})"
                for k in raw if k not in ("type", *KEYS[kind])]
    problems += [f"{key}: {kind} needs {k}" for k in KEYS[kind] if k not in raw]
    if problems:
        return None, problems
    if kind == "choice":
        values = raw["values"]
        if not isinstance(values, list) or not values:
            return None, [f"{key}.values: expected a non-empty list"]
        return Distribution("choice", tuple(values)), []
    numbers: dict[str, float] = {}
    for k in KEYS[kind]:
        value = raw[k]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{key}.{k}: {value!r} is not a number")
        numbers[k] = value
    if problems:
        return None, problems
    dist = Distribution(kind, **{k: (int(v) if k == "upper" else float(v)) for k, v in numbers.items()})
    where = f"{key}: {dist.describe()}"
    if kind == "randint" and (not float(numbers["upper"]).is_integer() or numbers["upper"] < 1):
        problems.append(f"{where}: upper must be an integer >= 1")
    if dist.min_value is not None and dist.min_value >= dist.max_value:
        problems.append(f"{where}: low must be < high")
    if dist.sigma is not None and dist.sigma <= 0:
        problems.append(f"{where}: sigma must be > 0")
    if dist.q is not None and dist.q <= 0:
        problems.append(f"{where}: q must be > 0")
    return (None if problems else dist), problems


def _check_values(task: Task, name: str, dist: Distribution, where: str) -> list[str]:
    """Every bounded value a distribution can produce must be a valid value of the parameter."""
    if name == "model_name":
        if dist.type != "choice":
            return [f"{where}: model_name must be a choice"]
        problems = []
        for value in dist.values:
            try:
                get_architecture(str(value), task.family)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
        return problems
    canonical = aliases_of(task.settings_cls).get(name, name)
    problems = []
    for value in dist.bounds():
        reason, allowed = check_value(task.settings_cls, canonical, value)
        if reason == "out of range":
            problems.append(f"{where}: {value!r} is out of range: {name} must be {allowed}")
        elif reason:
            problems.append(f"{where}: {value!r}: {reason}; {name} must be {allowed}")
    return problems


def parse_search_space(raw: Any, task: Task, key: str = "search_space") -> tuple[Subspace, ...]:
    """A list of subspaces (or one mapping) → validated subspaces; SettingsError lists every problem."""
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise SettingsError([f"{key}: expected a list of subspaces (mappings of hyperparameter: distribution)"],
                            "job file")
    known = sorted(set(task.settings_cls.model_fields) | set(aliases_of(task.settings_cls)))
    problems: list[str] = []
    subspaces = []
    for i, entry in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping) or not entry:
            problems.append(f"{where}: expected a mapping of hyperparameter: distribution")
            continue
        subspace: Subspace = {}
        for name, value in entry.items():
            name = str(name)
            if name not in known:
                problems.append(f"{where}." + unknown_name_message(name, known))
                continue
            dist, found = parse_distribution(value, f"{where}.{name}")
            problems += found
            if dist is not None:
                found = _check_values(task, name, dist, f"{where}.{name}: {dist.describe()}")
                problems += found
                subspace[name] = dist
        subspaces.append(subspace)
    if problems:
        raise SettingsError(problems, "job file")
    return tuple(subspaces)


def random_configs(space: Sequence[Subspace], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` draws: a subspace uniformly at random, then each of its hyperparameters."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sub = space[int(rng.integers(len(space)))]
        out.append({name: _plain(dist.sample(rng)) for name, dist in sub.items()})
    return out


def grid_configs(space: Sequence[Subspace], key: str = "search_space") -> list[dict[str, Any]]:
    """Every combination of every subspace, in order; grid sampling takes choice distributions only."""
    problems = [f"{key}[{i}].{name}: {d.describe()}: grid sampling takes only choice distributions"
                for i, sub in enumerate(space) for name, d in sub.items() if d.type != "choice"]
    if problems:
        raise SettingsError(problems, "job file")
    out = []
    for sub in space:
        names = list(sub)
        for combo in itertools.product(*(sub[n].grid() for n in names)):
            out.append(dict(zip(names, (_plain(v) for v in combo))))
    return out


def tune_space(space: Sequence[Subspace], key: str = "search_space") -> dict[str, Any]:
    """The Ray Tune param_space of a single (non-conditional) subspace, for bayesian search."""
    if len(space) != 1:
        message = (f"{key}: sampling_algorithm bayesian does not support a conditional search space "
                   f"({len(space)} subspaces); use random or grid, or give a single subspace")
        raise SettingsError([message], "job file")
    problems = [f"{key}[0].{name}: {d.describe()}: bayesian sampling takes only {', '.join(BAYESIAN_TYPES)}"
                for name, d in space[0].items() if d.type not in BAYESIAN_TYPES]
    if problems:
        raise SettingsError(problems, "job file")
    return {name: d.to_tune() for name, d in space[0].items()}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value

# ---------------------------------------------------------------- AutoMode


_AUTO_MODELS = {  # (cpu only, small data) → (with a GPU or more data)
    "classification": (["mobilenetv2", "resnet18", "resnet34"], ["resnet50", "seresnext", "vits16r224", "vitb16r224"]),
    "detection": (["fasterrcnn_resnet18_fpn", "fasterrcnn_resnet34_fpn"],
                  ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"]),
    "segmentation": (["maskrcnn_resnet18_fpn", "maskrcnn_resnet34_fpn"], ["maskrcnn_resnet50_fpn"]),
}
_AUTO_LR = {"classification": (1e-3, 5e-2), "detection": (1e-3, 1e-2), "segmentation": (1e-3, 1e-2)}
LARGE_DATA = 5000  # images; above this a CPU-only machine still gets the larger models


FEW_SHOT = 20  # images per class (the rarest one) below which AutoMode trains a head on frozen pretrained features


def auto_search_space(task: Task, n_images: int, gpus: float, fixed: Mapping[str, Any],
                      per_class: float | None = None) -> tuple[Subspace, ...]:
    """AutoMode: architectures that suit the data size and machine, each with a log-uniform learning rate;
    hyperparameters the user fixed in training_parameters are left out of the space. With pretrained
    weights (the default) and fewer than FEW_SHOT images for some class (`per_class`), every backbone
    group is frozen: a linear head on pretrained features, the standard few-shot baseline."""
    small, large = _AUTO_MODELS[task.family]
    models = small + large if gpus > 0 else (small + large[:1] if n_images > LARGE_DATA else small)
    low, high = _AUTO_LR[task.family]
    lr = Distribution("loguniform", min_value=math.log(low), max_value=math.log(high))
    if fixed.get("model_name"):
        models = [str(fixed["model_name"])]
    pretrained = str(fixed.get("weights", "DEFAULT")).strip().lower() not in {"none", "null", ""}
    few_shot = pretrained and per_class is not None and per_class < FEW_SHOT and "layers_to_freeze" not in fixed
    common: Subspace = {} if "learning_rate" in fixed else {"learning_rate": lr}
    if not few_shot:
        return ({"model_name": Distribution("choice", tuple(models)), **common},)
    return tuple({"model_name": Distribution("choice", (name,)), **common,
                  "layers_to_freeze": Distribution("choice", (len(get_architecture(name, task.family).freeze_groups),))}
                 for name in models)
