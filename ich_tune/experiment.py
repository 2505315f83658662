"""Loading an experiment or a search file: the config language's typed tree, checked against the model
families and the data's windows.

This sits above config/, models/ and data/: the config language knows nothing of torch or CT, so
the families (which register their arguments with the schema on import) and the window parser are
brought together here."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ich_tune.models  # noqa: F401  (each family registers its arguments with the schema on import)
from ich_tune.config.loader import load_tree, parse_yaml, set_path
from ich_tune.config.markers import Dimension, find_dimensions, grid_points, substitute
from ich_tune.config.schema import (
    MODEL_FAMILIES,
    ExperimentConfig,
    ModelConfig,
    Origins,
    SearchConfig,
    build,
    where,
)
from ich_tune.data.channels import CHANNELS_KEY, parse_channels
from ich_tune.errors import ConfigError

__all__ = ["ExperimentConfig", "Search", "SearchConfig", "build_experiment", "load_experiment",
           "load_search", "parse_overrides"]

SEARCH_KEYS = {f.name for f in dataclasses.fields(SearchConfig)}


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`--set model.dropout=0.2` pairs, each value read as YAML (so 0.2 is a number)."""
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {pair}: expected KEY.PATH=VALUE, e.g. --set model.dropout=0.2.")
        value, _ = parse_yaml(text, f"--set {pair}")
        parsed.append((key, value))
    return parsed


def _field_type(cls: type, name: str) -> Any:
    """The type of field `name` of `cls`; for `model`, of whichever family has that field."""
    if cls is ModelConfig:
        types_ = [typing.get_type_hints(family).get(name) for family in MODEL_FAMILIES.values()]
        return next((t for t in types_ if t is not None), None)
    return typing.get_type_hints(cls).get(name)


def _check_override_key(key: str, cls: type) -> None:
    """Refuse `--set a.b=..` where the schema makes `a` a single value, not a section of keys.

    Setting it would turn the value into a mapping, and the type error that follows would point at
    the file, not at the flag that caused it. `cls` is the config class the key starts in.
    """
    keys = key.split(".")
    for depth, name in enumerate(keys[:-1], start=1):
        if cls is SearchConfig and name == "experiment":
            cls = ExperimentConfig  # a free-form mapping to the schema, an experiment to the user
            continue
        hint = _field_type(cls, name)
        if hint is None:
            return  # an unknown key: build() names it and suggests the closest one
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None` is an X
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = options[0] if len(options) == 1 else hint
        if dataclasses.is_dataclass(hint):
            cls = hint
        elif typing.get_origin(hint) is dict:
            return  # a mapping of any keys
        else:
            prefix = ".".join(keys[:depth])
            raise ConfigError(f"--set {key}: key '{prefix}' is a single value, not a section of keys, "
                              f"so '{key}' cannot be set. Set the value whole, e.g. "
                              f"--set {prefix}=VALUE.")


def build_experiment(tree: dict, origins: Origins) -> ExperimentConfig:
    """A typed experiment from a tree without markers; its windows are checked here too, so a bad one
    is reported with its file and line before any data is read."""
    config = build(ExperimentConfig, tree, origins)
    try:
        parse_channels(config.data.channels)
    except ConfigError as err:
        raise ConfigError(f"{where(CHANNELS_KEY, origins)}: {str(err).removeprefix(CHANNELS_KEY + ': ')}") \
            from None
    return config


def load_experiment(path: Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict]:
    """A single-run experiment file: its typed config and its resolved tree."""
    tree, origins = load_tree(path)
    for key, value in parse_overrides(list(overrides)):
        _check_override_key(key, ExperimentConfig)
        set_path(tree, origins, key, value, f"--set {key}")
    dims = find_dimensions(tree, origins)
    if dims:
        raise ConfigError(f"{where(dims[0].path, origins)}: a search marker ({dims[0].kind}) in an "
                          "experiment file; run it as a search (`ich_tune run`) or give one value.")
    return build_experiment(tree, origins), tree


@dataclass
class Search:
    """A resolved search file: its settings, and the experiment tree whose markers it explores."""

    path: Path
    config: SearchConfig
    experiment: dict  # with markers, and the search's step budget written into `train`
    origins: Origins
    dimensions: list[Dimension]

    @property
    def name(self) -> str:
        return self.config.name or self.path.stem

    @property
    def grid_points(self) -> int:
        return grid_points(self.dimensions)

    @property
    def num_trials(self) -> int:
        """Trials the search will run (grid points x samples)."""
        return self.grid_points * self.config.num_samples

    @property
    def first_values(self) -> dict[str, Any]:
        """Each dimension at its first candidate: a concrete trial to show or to take settings from."""
        return {d.path: d.candidates()[0] for d in self.dimensions}

    def trial_experiment(self, values: dict[str, Any], experiment: dict | None = None) -> ExperimentConfig:
        """The typed experiment of one trial (of `experiment` if given: the tree with paths resolved)."""
        return build_experiment(substitute(experiment or self.experiment, values), self.origins)


RAY_RESOURCE_STEP = 1e-4  # Ray counts fractional resources in steps of this size


def load_search(path: Path, overrides: list[str] = ()) -> Search:
    """A search file, checked through: every value a trial may see is type-checked now."""
    path = Path(path)
    tree, origins = load_tree(path)
    for key, value in parse_overrides(list(overrides)):
        in_search = key.split(".")[0] in SEARCH_KEYS
        _check_override_key(key, SearchConfig if in_search else ExperimentConfig)
        if not in_search:
            key = f"experiment.{key}"
        set_path(tree, origins, key, value, f"--set {key.removeprefix('experiment.')}")
    config = build(SearchConfig, tree, origins)
    registered = config.registered_model
    if registered and (set(registered) & set("/:@") or registered.strip() != registered):
        raise ConfigError(f"{where('registered_model', origins)}: {registered!r} cannot name a "
                          "registered model (models:/NAME@alias reads '/', ':' and '@' as separators); "
                          "write letters, digits, '-', '_' or '.', or \"\" not to register.")
    if 0 < config.resources.gpu < RAY_RESOURCE_STEP:
        raise ConfigError(f"{where('resources.gpu', origins)}: {config.resources.gpu:g} is below the "
                          f"smallest share Ray schedules ({RAY_RESOURCE_STEP:g}); use 0 or a share such as "
                          "0.25.")
    experiment = dict(config.experiment)
    origins = {k.removeprefix("experiment."): v for k, v in origins.items()
               if k.startswith("experiment.")} | {"": origins.get("experiment", str(path))}
    budget = {"max_steps": config.num_train_steps, "val_batches": config.num_val_steps,
              "val_interval": config.val_interval}
    for key, value in budget.items():
        if value is not None:
            set_path(experiment, origins, f"train.{key}", value, f"{path}: search budget")
    dimensions = find_dimensions(experiment, origins)
    if config.search_alg.name == "optuna":
        for dim in dimensions:
            if dim.kind == "grid_search":
                raise ConfigError(f"{where(dim.path, origins)}: the optuna search algorithm cannot "
                                  f"take grid_search; write `choice: {list(dim.args)}` instead, "
                                  "or use search_alg.name: grid.")
    search = Search(path, config, experiment, origins, dimensions)
    firsts = search.first_values
    example = search.trial_experiment(firsts)
    for dim in dimensions:
        for value in dim.candidates()[1:]:
            search.trial_experiment(firsts | {dim.path: value})
    if example.train.max_steps is None:
        raise ConfigError(f"{path}: a search needs a step budget (ASHA's time axis is training steps): "
                          "add e.g. `num_train_steps: 20000` to the file, or set train.max_steps in its "
                          "experiment.")
    return search
