"""YAML files with `include:` chains and deep merge, remembering where every key came from.

The original experiment configs are split over files that include each other; a wrong value is only
easy to fix if the message names the file and line it came from, so every key path keeps an origin.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ich_tune.config.markers import MARKERS
from ich_tune.config.schema import Origins, where
from ich_tune.errors import ConfigError

MAX_DEPTH = 40  # mapping and list levels; the deepest real config has five
MAX_VALUES = 100_000  # values after aliases are expanded; stops a few lines from growing to gigabytes


class _Loader(yaml.SafeLoader):
    """Safe loading, plus 1e-5 read as a float (YAML 1.1 wants a dot) and key line numbers."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors raise plain Python errors on values Python cannot hold (month 13,
        an integer of 5,000 digits) and on explicit tags that do not fit (`!!int abc`, `!!map x`)."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError):
            kind = node.tag.rpartition(":")[2]
            shown = repr(node.value[:40]) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {shown} as {kind}",
                                                    node.start_mark) from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class _LinedDict(dict):
    lines: dict[Any, int]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LinedDict:
    loader.flatten_mapping(node)
    mapping = _LinedDict()
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str) or not key or "." in key:  # dots join keys into paths
            raise ConfigError(f"{loader.name}:{line}: a mapping key must be a plain name, got "
                              f"{repr(key)[:40]}; no dots, and quote one that YAML reads as a number "
                              "or true/false.")
        if key in mapping:
            raise ConfigError(f"{loader.name}:{line}: key '{key}' appears twice in one mapping; "
                              "keep one.")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


_INT = _Loader.yaml_constructors["tag:yaml.org,2002:int"]


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """An integer that fits in 64 bits: anything larger is a typo, and fails far from here."""
    value = _INT(loader, node)
    if not -(2**63) <= value < 2**63:
        raise yaml.constructor.ConstructorError(
            None, None, f"integer {node.value[:40]!r} does not fit in 64 bits", node.start_mark)
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str, name: str) -> tuple[Any, Origins]:
    """Parse one YAML document; origins map dotted key paths to 'name:line'."""
    try:
        loader = _Loader(text)  # checks every character up front
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(f"{name}:{line}: character {err.character:#04x} is not allowed in YAML; "
                          "remove it (is this a binary file?).") from None
    loader.name = name
    try:
        tree = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{line}: not valid YAML: {err.problem or err}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML: {err}.") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to read; a config needs a few levels.") from None
    finally:
        loader.dispose()
    origins: Origins = {"": f"{name}:1"}
    return _plain(tree, "", name, origins, itertools.count()), origins


def _plain(node: Any, path: str, name: str, origins: Origins, counter: Iterator[int],
           depth: int = 0) -> Any:
    """Plain dicts and lists, each alias expanded into its own copy, within sane size limits."""
    if next(counter) > MAX_VALUES:
        raise ConfigError(f"{name}: more than {MAX_VALUES:,} values (aliases that expand?); "
                          "a config holds a few hundred.")
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where(path, origins)}: nested more than {MAX_DEPTH} levels deep.")
    if isinstance(node, dict):
        lines = getattr(node, "lines", {})
        out = {}
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in lines:
                origins[sub] = f"{name}:{lines[key]}"
            out[key] = _plain(value, sub, name, origins, counter, depth + 1)
        return out
    if isinstance(node, list):
        return [_plain(v, f"{path}.{i}", name, origins, counter, depth + 1) for i, v in enumerate(node)]
    return node


def load_tree(path: Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """A file's tree with every `include:` (at any depth) resolved and merged."""
    path = Path(path)
    tree, origins = parse_yaml(read_text(path), str(path))
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}:1: the file must hold a mapping of keys, not {type(tree).__name__}.")
    return _resolve(tree, origins, "", path, _stack + (path.resolve(),))


def read_text(path: Path) -> str:
    """A YAML file's text; a missing, unreadable or non-UTF-8 file is one located ConfigError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file. Check the path (a relative path starts in "
                          f"{Path.cwd()}/).") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder; give a YAML file.") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err}).") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: byte {data[err.start]:#04x} is not UTF-8 text; save the "
                          "file as UTF-8 (is this a binary file?).") from None


def _resolve(node: dict, origins: Origins, prefix: str, file: Path,
             stack: tuple[Path, ...]) -> tuple[dict, Origins]:
    own: dict = {}
    own_origins = {k: v for k, v in origins.items() if _under(k, prefix)}
    for key, value in node.items():
        if key != "include" and isinstance(value, dict):
            sub = f"{prefix}.{key}" if prefix else str(key)
            own[key], child = _resolve(value, origins, sub, file, stack)
            own_origins.update(child)
        elif key != "include":
            own[key] = value
    if "include" not in node:
        return own, own_origins
    key_path = f"{prefix}.include" if prefix else "include"
    at = origins.get(key_path, str(file))
    includes = node["include"]
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        got = "a mapping" if isinstance(includes, dict) else repr(includes)
        raise ConfigError(f"{at}: 'include' takes a path or a list of paths, got {got}. Write e.g. "
                          "`include: base.yaml` or `include: [base.yaml, more.yaml]`.")
    merged: dict = {}
    merged_origins: Origins = {}
    for name in includes:
        target = _find_include(name, file, at)
        if target.resolve() in stack:
            chain = " -> ".join(str(p) for p in stack + (target.resolve(),))
            raise ConfigError(f"{at}: include cycle: {chain}. Remove one of these includes.")
        sub_tree, sub_origins = load_tree(target, stack)
        sub_origins = {_join(prefix, k): v for k, v in sub_origins.items() if k}
        merged, merged_origins = merge(merged, merged_origins, sub_tree, sub_origins, prefix)
    return merge(merged, merged_origins, own, own_origins, prefix)


def _find_include(name: str, file: Path, at: str) -> Path:
    """Relative to the including file, then to the working directory (the original's repo paths)."""
    for candidate in (file.parent / name, Path(name)):
        try:
            if candidate.is_file():
                return candidate
        except OSError as err:  # e.g. a name too long for the file system
            raise ConfigError(f"{at}: included file '{name}': {err.strerror}. Fix the path.") from None
    raise ConfigError(f"{at}: included file '{name}' not found (looked in {file.parent}/ and "
                      f"{Path.cwd()}/). Fix the path or create the file.")


def merge(base: dict, base_origins: Origins, over: dict, over_origins: Origins,
          prefix: str = "") -> tuple[dict, Origins]:
    """Deep merge: mappings merge key by key; lists and scalars in `over` replace."""
    out = dict(base)
    origins = dict(base_origins)
    for key, value in over.items():
        sub = _join(prefix, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not is_marker(value):
            out[key], origins = merge(out[key], origins, value, over_origins, sub)
        else:
            origins = {k: v for k, v in origins.items() if not _under(k, sub)}
            out[key] = value
        origins.update({k: v for k, v in over_origins.items() if _under(k, sub)})
    return out, origins


def set_path(tree: dict, origins: Origins, dotted: str, value: Any, origin: str) -> None:
    """Set a.b.c = value in place, creating mappings on the way (the schema rejects bad keys)."""
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict) or is_marker(child):
            raise ConfigError(f"{origin}: '{'.'.join(keys[: i + 1])}' holds a value, not a mapping.")
        node = child
    node[keys[-1]] = value
    for k in [k for k in origins if _under(k, dotted)]:
        del origins[k]
    origins[dotted] = origin


def is_marker(value: Any) -> bool:
    """A mapping that declares a search dimension (`grid_search: [..]`, `uniform: {..}`, ...)."""
    return isinstance(value, dict) and any(k in MARKERS for k in value)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")
