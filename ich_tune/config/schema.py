"""The typed shape of an experiment and of a search.

Every key a YAML file may hold is a dataclass field here; `build` turns a plain tree into these
classes and names the file, line and dotted key of anything that does not fit.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ich_tune.errors import ConfigError


def bounded(default: Any, low: float | None = None, high: float | None = None, **kw: Any) -> Any:
    """A field whose numeric value must lie in [low, high] (None leaves a side open)."""
    return field(default=default, metadata={"low": low, "high": high, **kw})


@dataclass
class SyntheticConfig:
    """Synthetic RSNA-layout data written to `data.root` on first use when it holds no dataset."""

    studies: int = bounded(40, 2)
    slices: int = bounded(24, 1)
    size: int = bounded(256, 32)
    seed: int = bounded(0, 0)
    positive_rate: float = bounded(0.144, 0.0, 1.0)  # fraction of slices with a bleed (RSNA: 0.144)
    quirk_rate: float = bounded(0.05, 0.0, 1.0)  # fraction of files with an RSNA DICOM quirk
    difficulty: Literal["demo", "hard"] = "demo"  # hard: smaller, fainter bleeds in more noise (phantom.py)


@dataclass
class DataConfig:
    root: str | None = None  # folder with stage_2_train/ and stage_2_train.csv
    synthetic: SyntheticConfig | None = None
    cache_dir: str | None = None  # default: <root>/.ich_tune_cache
    full_size: int = bounded(512, 16)  # every slice is first brought to this size ...
    lod: int = bounded(0, 0, 6)  # ... then halved `lod` times (the original's level of detail)
    channels: str | list[str | dict[str, float | str]] = "hu"  # "hu" or named/custom windows
    context: int = bounded(0, 0, 8)  # 2.5D: k slices below and above as extra channels (data/neighbours.py)
    train_fraction: float = bounded(0.7, 0.0, 1.0)  # the original's data split
    split_seed: int = bounded(0, 0)
    folds: int = bounded(0, 0)  # 0: one train/val split; k: k-fold by patient
    fold: int = bounded(0, 0)
    max_images: int | None = bounded(None, 1)  # use only the first N images (quick checks)
    max_bad_fraction: float = bounded(0.01, 0.0, 1.0)
    augment: bool = False
    balanced: bool = False  # class-balanced sampling of training slices
    workers: int = bounded(0, 0)  # preprocessing processes; 0 = every core this process may use

    @property
    def size(self) -> int:
        return self.full_size >> self.lod


@dataclass
class ModelConfig:
    """`model:` names a family (a module of ich_tune/models/); that family's config class adds its
    own arguments, and `build` checks the section against it."""

    name: str = "ResNetClassifier2d"
    num_classes: int = bounded(6, 1)
    init_from: str | None = None  # weights file (or MLflow run) to start from

    @staticmethod
    def family(name: Any, path: str = "model", origins: Origins | None = None) -> type[ModelConfig]:
        """The config class of model family `name`."""
        if name not in MODEL_FAMILIES:
            close = difflib.get_close_matches(str(name), [str(k) for k in MODEL_FAMILIES], n=1)
            hint = f"Did you mean '{close[0]}'?" if close else f"Known: {', '.join(MODEL_FAMILIES)}."
            raise ConfigError(f"{where(_join(path, 'name'), origins or {})}: unknown model family "
                              f"{_show(name)}. {hint}")
        return MODEL_FAMILIES[name]


# family name -> the dataclass of its arguments; each module of ich_tune.models adds its own on import
# (ich_tune.experiment imports them all), so this language needs no torch
MODEL_FAMILIES: dict[str, type[ModelConfig]] = {}


def default_model() -> ModelConfig:
    return ModelConfig.family(ModelConfig.name)()


@dataclass
class LossConfig:
    objective: Literal["mse", "bce", "weighted_bce"] = "mse"


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = bounded(2e-4, 0.0)
    weight_decay: float = bounded(1e-5, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0)  # sgd only
    grad_clip: float | None = bounded(None, 0.0)


@dataclass
class ScheduleConfig:
    warmup_steps: int = bounded(256, 0)
    decay: Literal["constant", "cosine"] = "constant"


@dataclass
class TrainConfig:
    batch_size: int = bounded(4, 1)
    max_epochs: float = bounded(8, 0.0)
    max_steps: int | None = bounded(None, 1)  # overrides max_epochs when set
    val_interval: int = bounded(1000, 1)  # steps between validations
    val_batches: int | None = bounded(None, 1)  # None: the whole validation split
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # CUDA only; auto = bf16 where supported
    channels_last: bool = True  # CUDA only
    deterministic: bool = False
    threads: int | None = bounded(None, 1)  # torch CPU threads; None = the CPUs given to the run
    cuda_memory_fraction: float | None = bounded(None, 0.0, 1.0)


@dataclass
class LoggingConfig:
    print_interval: int = bounded(50, 1)
    tensorboard: bool = True
    plot_interval: int = bounded(10000, 1)
    plot_examples: int = bounded(6, 1)
    plot_baseline: float = bounded(0.2, 0.0, 1.0)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=default_model)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = bounded(1498, 0)


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo", "median"] = "asha"  # median: Ray's median stopping rule
    grace_period: int = bounded(2000, 1)  # training steps before a trial can be stopped
    reduction_factor: float = bounded(3, 1.01)


@dataclass
class SearchAlgConfig:
    name: Literal["grid", "shuffled", "random", "optuna"] = "grid"  # shuffled: the grid in a random order
    seed: int | None = bounded(0, 0)


@dataclass
class ResourcesConfig:
    cpu: float = bounded(1, 0.0)
    gpu: float = bounded(0.25, 0.0)  # a fraction shares one GPU between 1/gpu trials


@dataclass
class SearchConfig:
    experiment: dict[str, Any] = field(default_factory=dict)  # an experiment tree with markers
    name: str | None = None  # default: the search file's name
    num_samples: int = bounded(1, 1)
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: SearchAlgConfig = field(default_factory=SearchAlgConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = bounded(None, 1)
    num_train_steps: int | None = bounded(None, 1)  # overrides experiment train.max_steps
    num_val_steps: int | None = bounded(None, 1)  # overrides experiment train.val_batches
    val_interval: int | None = bounded(None, 1)  # overrides experiment train.val_interval
    randomize_seed: bool = False  # a random seed per trial instead of the experiment's seed
    storage: str = "runs"  # trial folders and checkpoints: a folder, or a URI Ray writes (s3://, gs://)
    tracking_uri: str | None = None  # default: sqlite:///<storage, or run --local-dir for a URI>/mlflow.db
    registered_model: str | None = None  # the best model's registered name; default the search name, "" none
    keep_checkpoints: int = bounded(2, 1)
    max_failures: int = bounded(2, 0)  # retries of a failed trial from its last checkpoint


Origins = dict[str, str]  # dotted key path -> "file:line"


def where(path: str, origins: Origins) -> str:
    """'file:line, key a.b.c' for messages; walks up to the nearest key that has an origin."""
    probe = path
    while probe and probe not in origins:
        probe = probe.rpartition(".")[0]
    place = origins.get(probe) or origins.get("", "")
    key = f"key '{path}'" if path else "top level"
    return f"{place}: {key}" if place else key


def build(cls: type, tree: Any, origins: Origins, path: str = "") -> Any:
    """A `cls` instance from a plain YAML tree, or a ConfigError that points at the bad key."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where(path, origins)}: expected a mapping of {_keys_hint(cls)}, "
                          f"got {_show(tree)}.")
    if cls is ModelConfig:  # the family named in the section decides which arguments it takes
        cls = ModelConfig.family(tree.get("name", ModelConfig.name), path, origins)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in tree:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(fields)}."
            raise ConfigError(f"{where(_join(path, key), origins)}: unknown key.{hint}")
    values = {}
    for name, value in tree.items():
        sub = _join(path, name)
        values[name] = _coerce(value, hints[name], sub, origins)
        _check_bounds(values[name], fields[name].metadata, sub, origins)
    return cls(**values)


def _coerce(value: Any, hint: Any, path: str, origins: Origins) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path, origins)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where(path, origins)}: expected {_type_name(hint)}, got {_show(value)}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where(path, origins)}: {_show(value)} is not one of {choices}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where(path, origins)}: expected a list, got {_show(value)}.")
        return [_coerce(v, args[0], f"{path}.{i}", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path, origins)}: expected a mapping, got {_show(value)}.")
        if args and args[1] is not Any:
            return {k: _coerce(v, args[1], _join(path, k), origins) for k, v in value.items()}
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, origins, path)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        number = _float(value)
        if number is not None and not math.isfinite(number):  # NaN would slip through every bound
            raise ConfigError(f"{where(path, origins)}: expected a finite number, got {_show(value)}.")
        if number is not None:
            return number
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where(path, origins)}: expected {_type_name(hint)}, got {_show(value)}.")


def _float(value: int | float | str) -> float | None:
    """The value as a float, None for text that is no number (YAML 1.1 reads "1e-5" as text)."""
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return math.inf
    except ValueError:
        return None


def _check_bounds(value: Any, meta: Any, path: str, origins: Origins) -> None:
    if isinstance(value, list):
        if not value and meta.get("nonempty"):
            raise ConfigError(f"{where(path, origins)}: must not be empty; give at least one value.")
        for index, item in enumerate(value):
            _check_bounds(item, meta, f"{path}.{index}", origins)
        return
    low, high = meta.get("low"), meta.get("high")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{where(path, origins)}: {value} is outside {span}.")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(hint: Any) -> str:
    if hint in (int, float, str, bool):
        return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]
    return str(hint).replace("typing.", "")


def _keys_hint(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
