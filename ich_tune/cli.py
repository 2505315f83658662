"""The command line: `python -m ich_tune VERB ...` (also installed as `ich-tune`)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from ich_tune.bench import BENCHMARKS
from ich_tune.config.loader import load_tree
from ich_tune.config.markers import substitute
from ich_tune.config.schema import SyntheticConfig
from ich_tune.errors import Interrupted, UserError
from ich_tune.logs import to_stdout
from ich_tune.trials import COMPLETED, checkpoint_uri, table


def _add_config_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("file", type=Path, help=f"{what} YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set model.dropout=0.2 (repeatable)")


def cmd_show_config(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.experiment import load_experiment, load_search
    from ich_tune.search.storage import local_root, normalize
    from ich_tune.tracking.client import resolve_stores

    tree, _ = load_tree(args.file)
    if "experiment" not in tree:
        config, _ = load_experiment(args.file, args.overrides)
        print(f"# experiment {args.file}, fully resolved")
        print(_yaml(dataclasses.asdict(config)), end="")
        return 0
    search = load_search(args.file, args.overrides)
    dims = search.dimensions
    example = search.trial_experiment(search.first_values)
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
    local = local_root(normalize(search.config.storage), None)
    print(f"# {resolve_stores(None, search.config.tracking_uri, local).describe()}")
    return 0


def _add_rescan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rescan", action="store_true",
                        help="stat every data file instead of trusting an unchanged folder and labels CSV "
                             "(finds files rewritten in place)")


def _experiment(args: argparse.Namespace):
    """The experiment file with --set and --data-root applied."""
    # loaded by the verbs that read an experiment only: the CLI starts without torch, Ray or MLflow
    from ich_tune.experiment import load_experiment

    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={json.dumps(str(args.data_root))}")
    return load_experiment(args.file, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.data.prepare import prepare_cache
    from ich_tune.evaluation.metrics import format_metrics
    from ich_tune.tracking.references import resolve_weights
    from ich_tune.training.checkpoint import save_checkpoint
    from ich_tune.training.loop import train

    config, _ = _experiment(args)
    out = args.out or Path("runs/train") / f"{args.file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    if config.model.init_from:  # an MLflow run or search is fetched to a file once, here
        config.model.init_from = str(resolve_weights(config.model.init_from, None, out / "init")[0])
    (out / "config.yaml").write_text(_yaml(dataclasses.asdict(config)))
    started = time.perf_counter()
    cache = prepare_cache(config.data, rescan=args.rescan)
    outcome = train(config, cache, out)
    save_checkpoint(out / "weights.pt", config, outcome.model)
    print(f"\nvalidation after {outcome.steps} steps ({time.perf_counter() - started:.0f} s in all):")
    print(format_metrics(outcome.metrics))
    print(f"\nweights: {out / 'weights.pt'}\nconfig:  {out / 'config.yaml'}\n"
          f"curves:  tensorboard --logdir {out}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.data.cache import open_cache
    from ich_tune.data.prepare import prepare_cache

    config, _ = _experiment(args)
    path = prepare_cache(config.data, rescan=args.rescan)
    cache = open_cache(path)
    manifest = cache.manifest
    print(f"cache: {path}\n{manifest['decoded']} of {manifest['images']} slices decoded, "
          f"{len(manifest['skipped'])} skipped, {manifest['bytes'] / 2**20:.1f} MiB, "
          f"shape {list(cache.images.shape)} {cache.images.dtype}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.data.synthetic import generate

    summary = generate(args.out, studies=args.studies, slices=args.slices, size=args.size,
                       seed=args.seed, positive_rate=args.positive_rate, quirk_rate=args.quirk_rate)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.experiment import load_search
    from ich_tune.search.driver import run_search
    from ich_tune.search.options import RunOptions
    from ich_tune.search.storage import name_of
    from ich_tune.tracking.client import search_pages

    storage = [f"storage={json.dumps(args.storage)}"] if args.storage else []
    search = load_search(args.file, [*args.overrides, *storage])
    options = RunOptions(data_root=args.data_root, address=args.address, resume=args.resume,
                         tracking_uri=args.tracking_uri, name=args.name, num_gpus=args.num_gpus,
                         dashboard_port=args.dashboard_port, local_dir=args.local_dir, rescan=args.rescan,
                         verbose=args.verbose)
    started = time.perf_counter()
    try:
        outcome = run_search(search, options)
    except Interrupted as stop:
        print(f"\n{stop}\ncontinue it with:\n  {_resume_command(args, name_of(stop.run_dir))}",
              file=sys.stderr)
        return 128 + stop.signal_number
    metric, mode = search.config.metric, search.config.mode
    print(f"\n{len(outcome.trials)} trials in {time.perf_counter() - started:.0f} s")
    print(table(outcome.trials, metric, mode))
    if outcome.best is None:
        print("no trial completed with a checkpoint; see the table and the errors above.", file=sys.stderr)
        return 1
    best = outcome.best
    print(f"\nbest: trial {best.trial_id}, {metric} {best.best:.4f} "
          f"({', '.join(f'{k}={v}' for k, v in best.params.items())})")
    print(f"  checkpoint: {checkpoint_uri(best.checkpoint)}")
    print(f"  MLflow parent run {outcome.parent_run_id}: artifacts best/weights.pt, best/config.yaml, "
          f"trials.csv, model (mlflow.pyfunc.load_model('runs:/{outcome.parent_run_id}/model'))")
    compare, best_page = search_pages(outcome.tracking_uri, outcome.parent_run_id, best.trial_id)
    print(f"  compare trials: {compare}")
    print(f"  best trial's MLflow run: {best_page}")
    print(f"  {outcome.importance.line()}")
    return 0 if any(t.status in COMPLETED for t in outcome.trials) else 1


def _resume_command(args: argparse.Namespace, run_name: str) -> str:
    """The `run` command line that continues this search: the same flags, with --name and --resume."""
    words = ["python", "-m", "ich_tune", "run", str(args.file)]
    words += [f"--set={override}" for override in args.overrides]
    for flag in ("data_root", "storage", "local_dir", "address", "tracking_uri", "num_gpus"):
        if getattr(args, flag) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join([*words, "--name", run_name, "--resume"])


def cmd_predict(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.predict.outputs import save_predictions
    from ich_tune.predict.scoring import predict_dicom
    from ich_tune.tracking.references import load_trained

    if args.out.is_dir():  # found now, not after the whole folder has been predicted
        raise UserError(f"--out {args.out}: a folder; give the submission file to write, e.g. "
                        f"{args.out / 'submission.csv'}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1.")
    model, config = load_trained(args.model, args.tracking_uri, args.config)
    started = time.perf_counter()
    prediction = predict_dicom(model, config, args.dicom_dir, args.batch_size, args.workers)
    print(f"predicted in {time.perf_counter() - started:.0f} s")
    save_predictions(prediction, args.out, args.format)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    import numpy as np

    from ich_tune.evaluation.assess import assess, html_page
    from ich_tune.evaluation.bootstrap import roc_bands
    from ich_tune.evaluation.metrics import format_metrics
    from ich_tune.evaluation.plots import reliability_diagram, roc_curves
    from ich_tune.files import atomic
    from ich_tune.predict.evaluate import predict_split
    from ich_tune.tracking.references import load_model

    trained = load_model(args.model, args.tracking_uri, args.config)
    config, calibration = trained.config, trained.calibration
    if args.data_root:
        config.data.root = str(args.data_root)
    probs, labels, groups = predict_split(trained.model, config, args.split, args.batch_size)
    assessment = assess(probs, labels, groups, args.split, calibration, args.resamples)
    what = "the validation split" if args.split == "val" else "all labelled slices"
    print(f"\n{args.model} on {what} of {config.data.root}:")
    print(format_metrics(assessment.metrics))
    print("\n" + "\n".join(assessment.lines()))
    if calibration is None:
        print("(no calibration stored with this model: probabilities as the network gives them, no "
              "operating points)")
    if args.report:
        scaled = calibration.apply(probs) if calibration else probs
        bands = roc_bands(scaled, labels, groups, np.linspace(0.0, 1.0, 101))
        figures = {"ROC curves with 95% bands": roc_curves(scaled, labels, bands),
                   "reliability": reliability_diagram(probs, labels, scaled if calibration else None)}
        with atomic(args.report) as partial:
            partial.write_text(html_page(f"{args.model} on {what}", assessment, figures))
        print(f"report: {args.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # loaded by this verb only: the CLI starts without torch, Ray or MLflow
    from ich_tune.tracking.report import search_report

    print(search_report(args.name, args.sort, args.tracking_uri, args.run))
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

    train = verbs.add_parser("train", help="train one experiment, no Ray")
    _add_config_args(train, "experiment")
    train.add_argument("--data-root", type=Path, help="RSNA-layout folder (sets data.root)")
    train.add_argument("--out", type=Path, help="output folder (default runs/train/NAME-TIME)")
    _add_rescan(train)
    train.set_defaults(func=cmd_train)

    pre = verbs.add_parser("preprocess", help="build the preprocessed cache of an experiment's data")
    _add_config_args(pre, "experiment")
    pre.add_argument("--data-root", type=Path, help="RSNA-layout folder (sets data.root)")
    _add_rescan(pre)
    pre.set_defaults(func=cmd_preprocess)

    run = verbs.add_parser("run", help="run a hyperparameter search with Ray Tune")
    _add_config_args(run, "search")
    run.add_argument("--data-root", type=Path, help="RSNA-layout folder (sets data.root)")
    run.add_argument("--address", help="join this Ray cluster instead of starting one (HEAD:6379, or auto; "
                     "default $RAY_ADDRESS, which `ray job submit` sets)")
    run.add_argument("--resume", action="store_true", help="continue the latest (or --name) run")
    _add_rescan(run)
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite in the storage folder, or "
                     "in --local-dir when storage is a URI)")
    run.add_argument("--name", help="run folder under <storage>/<search>/ (default: a timestamp)")
    run.add_argument("--registered-model", metavar="NAME", dest="overrides", action="append",
                     type=lambda name: f"registered_model={json.dumps(name)}",
                     help="register the best model as a version of NAME (default: the search's name)")
    run.add_argument("--no-register", dest="overrides", action="append_const", const="registered_model=''",
                     help="do not register the best model")
    run.add_argument("--storage", help="trial folders and checkpoints: a folder every node sees, or a URI "
                     "such as s3://bucket/prefix (sets storage)")
    run.add_argument("--local-dir", type=Path, help="this machine's own files (run lock, default MLflow "
                     "store, init weights) when storage is a URI (default ~/.cache/ich_tune)")
    run.add_argument("--num-gpus", type=int, help="GPUs a local Ray declares (default: detected)")
    run.add_argument("--dashboard-port", type=int,
                     help="port of a local Ray's dashboard on 127.0.0.1 (default $ICH_TUNE_DASHBOARD_PORT "
                          "or 8265)")
    run.add_argument("--verbose", action="store_true",
                     help="everything as it comes: Ray's status tables, every trial's output, Ray's and "
                          "MLflow's log lines (default: a live view of the trials; each trial's output in "
                          "its folder's trial.log, Ray's and MLflow's lines in the run folder's driver.log)")
    run.set_defaults(func=cmd_run)

    predict = verbs.add_parser("predict", help="score every CT slice of a DICOM folder")
    evaluate = verbs.add_parser("evaluate", help="the metric table of a trained model on labelled slices")
    for sub in (predict, evaluate):
        sub.add_argument("--model", required=True, metavar="MODEL",
                         help="weights.pt, a checkpoint folder, an MLflow run id, runs:/ID or search:NAME")
        sub.add_argument("--config", type=Path, help="experiment file of the model (default: its own)")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
        sub.add_argument("--batch-size", type=int, help="slices per batch (default: the training batch)")
    predict.add_argument("--dicom-dir", type=Path, required=True,
                         help="folder of DICOM files, any names, nested study/series folders too")
    predict.add_argument("--out", type=Path, required=True, help="CSV to write")
    predict.add_argument("--format", choices=("kaggle", "wide"),
                         help="kaggle: ID,Label submission (default for a folder of ID_*.dcm); wide: a row "
                              "per image with its UIDs, plus OUT-stem.studies.csv (default otherwise)")
    predict.add_argument("--workers", type=int, help="processes reading DICOM (default: all cores)")
    predict.set_defaults(func=cmd_predict)
    evaluate.add_argument("--data-root", type=Path, help="RSNA-layout folder (sets data.root)")
    evaluate.add_argument("--split", choices=("val", "all"), default="val",
                          help="val: the patients training held out (default); all: every labelled slice")
    evaluate.add_argument("--resamples", type=int, default=1000,
                          help="patient resamples of the bootstrap behind each 95%% interval (default 1000)")
    evaluate.add_argument("--report", type=Path, metavar="F.html",
                          help="also write a self-contained HTML report: metrics with intervals, operating "
                               "points, calibration, ROC curves with bands, reliability diagrams")
    evaluate.set_defaults(func=cmd_evaluate)

    report = verbs.add_parser("report", help="the trials and best config of a search, from MLflow")
    report.add_argument("name", help="search name (the MLflow experiment)")
    report.add_argument("--sort", metavar="METRIC", help="metric to rank by (default: the search's)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///runs/mlflow.db)")
    report.add_argument("--run", help="parent run id of the search (default: the latest)")
    report.set_defaults(func=cmd_report)

    bench = verbs.add_parser("bench", help="benchmarks: data, train, search, packing")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        bench_module = importlib.import_module(module)
        sub = kinds.add_parser(name, help=bench_module.__doc__.strip().splitlines()[0])
        bench_module.add_arguments(sub)
        sub.set_defaults(func=bench_module.run)

    demo = verbs.add_parser("demo-data", help="write synthetic RSNA-layout DICOM data")
    demo.add_argument("--out", type=Path, required=True, help="folder to write")
    defaults = SyntheticConfig()  # the same defaults as data.synthetic in an experiment file
    demo.add_argument("--studies", type=int, default=defaults.studies)
    demo.add_argument("--slices", type=int, default=defaults.slices, help="slices per study")
    demo.add_argument("--size", type=int, default=defaults.size, help="image size in pixels")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--positive-rate", type=float, default=defaults.positive_rate,
                      help="fraction of slices with a bleed (RSNA: 0.144)")
    demo.add_argument("--quirk-rate", type=float, default=defaults.quirk_rate,
                      help="fraction of files with an RSNA DICOM quirk")
    demo.set_defaults(func=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    to_stdout()
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
