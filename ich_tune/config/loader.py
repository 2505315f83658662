"""YAML files with `include:` chains and deep merge, remembering where every key came from.

The original experiment configs are split over files that include each other; a wrong value is only
easy to fix if the message names the file and line it came from, so every key path keeps an origin.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ich_tune.config.markers import MARKERS
from ich_tune.config.schema import Origins
from ich_tune.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """Safe loading, plus 1e-5 read as a float (YAML 1.1 wants a dot) and key line numbers."""


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
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise ConfigError(f"{loader.name}:{line}: a mapping key must be a plain name.")
        if key in mapping:
            raise ConfigError(f"{loader.name}:{line}: key '{key}' appears twice in one mapping; "
                              "keep one.")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, name: str) -> tuple[Any, Origins]:
    """Parse one YAML document; origins map dotted key paths to 'name:line'."""
    loader = _Loader(text)
    loader.name = name
    try:
        tree = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{line}: not valid YAML: {err.problem or err}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML: {err}.") from None
    finally:
        loader.dispose()
    origins: Origins = {"": f"{name}:1"}
    return _plain(tree, "", name, origins), origins


def _plain(node: Any, path: str, name: str, origins: Origins) -> Any:
    if isinstance(node, dict):
        lines = getattr(node, "lines", {})
        out = {}
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in lines:
                origins[sub] = f"{name}:{lines[key]}"
            out[key] = _plain(value, sub, name, origins)
        return out
    if isinstance(node, list):
        return [_plain(v, f"{path}.{i}", name, origins) for i, v in enumerate(node)]
    return node


def load_tree(path: Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """A file's tree with every `include:` (at any depth) resolved and merged."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file. Check the path (a relative path starts in "
                          f"{Path.cwd()}/).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err}).") from None
    tree, origins = parse_yaml(text, str(path))
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}:1: the file must hold a mapping of keys, not {type(tree).__name__}.")
    return _resolve(tree, origins, "", path, _stack + (path.resolve(),))


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
    where = origins.get(key_path, str(file))
    includes = node["include"]
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        got = "a mapping" if isinstance(includes, dict) else repr(includes)
        raise ConfigError(f"{where}: 'include' takes a path or a list of paths, got {got}. Write e.g. "
                          "`include: base.yaml` or `include: [base.yaml, more.yaml]`.")
    merged: dict = {}
    merged_origins: Origins = {}
    for name in includes:
        target = _find_include(name, file, where)
        if target.resolve() in stack:
            chain = " -> ".join(str(p) for p in stack + (target.resolve(),))
            raise ConfigError(f"{where}: include cycle: {chain}. Remove one of these includes.")
        sub_tree, sub_origins = load_tree(target, stack)
        sub_origins = {_join(prefix, k): v for k, v in sub_origins.items() if k}
        merged, merged_origins = merge(merged, merged_origins, sub_tree, sub_origins, prefix)
    return merge(merged, merged_origins, own, own_origins, prefix)


def _find_include(name: str, file: Path, where: str) -> Path:
    """Relative to the including file, then to the working directory (the original's repo paths)."""
    for candidate in (file.parent / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{where}: included file '{name}' not found (looked in {file.parent}/ and "
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
