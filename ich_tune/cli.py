"""The command line: `python -m ich_tune VERB ...` (also installed as `ich-tune`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from ich_tune.errors import UserError


def _add_config_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("file", type=Path, help=f"{what} YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set model.dropout=0.2 (repeatable)")


def cmd_show_config(args: argparse.Namespace) -> int:
    from ich_tune.config import load_experiment, load_search
    from ich_tune.config.loader import load_tree
    from ich_tune.config.markers import substitute

    tree, _ = load_tree(args.file)
    if "experiment" not in tree:
        config, _ = load_experiment(args.file, args.overrides)
        print(f"# experiment {args.file}, fully resolved")
        print(_yaml(dataclasses.asdict(config)), end="")
        return 0
    search = load_search(args.file, args.overrides)
    dims = search.dimensions
    example = search.trial_experiment({d.path: d.candidates()[0] for d in dims})
    shown = substitute(dataclasses.asdict(example), {d.path: {d.kind: _plain(d.args)} for d in dims})
    settings = {k: v for k, v in dataclasses.asdict(search.config).items() if k != "experiment"}
    print(f"# search '{search.name}' ({args.file}), fully resolved")
    print(_yaml({"experiment": shown}), end="")
    print(_yaml(settings), end="")
    print("\n# dimensions")
    width = max((len(d.path) for d in dims), default=0)
    for d in dims:
        count = f"  ({len(d.args)} values)" if d.kind == "grid_search" else ""
        print(f"  {d.path:<{width}}  {d.describe()}{count}")
    if not dims:
        print("  (none: every trial runs the same config)")
    grids = [str(len(d.args)) for d in dims if d.kind == "grid_search"]
    samples = search.config.num_samples
    formula = " x ".join(grids) + " grid points" if grids else "1 grid point"
    print(f"\n# trials: {formula} x {samples} samples = {search.num_trials} trials")
    print(f"# resources per trial: {_resources(search.config.resources)}")
    return 0


def _resources(res: object) -> str:
    text = f"{res.cpu:g} CPU, {res.gpu:g} GPU"
    if 0 < res.gpu < 1:
        text += f" ({int(1 // res.gpu)} trials share one GPU)"
    return text


def _plain(args: object) -> object:
    return list(args) if isinstance(args, tuple) else args


def _yaml(tree: dict) -> str:
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ich_tune", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser("show-config", help="print a resolved experiment or search file")
    _add_config_args(show, "experiment or search")
    show.set_defaults(func=cmd_show_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
