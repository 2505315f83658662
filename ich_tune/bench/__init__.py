"""Benchmarks (`python -m ich_tune bench NAME`): each module has add_arguments(parser) and run(args).

Every benchmark measures its candidates side by side in one process, so the ratios it prints hold
on a noisy machine even where the absolute figures do not.

The CLI imports every module here to build its parser, so each imports torch, Ray, MLflow and the
parts of ich_tune that load them inside the functions that use them: the CLI's start stays fast.
"""

BENCHMARKS = {
    "data": "ich_tune.bench.data",
    "train": "ich_tune.bench.train",
    "search": "ich_tune.bench.search",
    "packing": "ich_tune.bench.packing",
    "predict": "ich_tune.bench.predict",
    "startup": "ich_tune.bench.startup",
}
