"""Benchmarks (`python -m ich_tune bench NAME`): each module has add_arguments(parser) and run(args).

Every benchmark measures its candidates side by side in one process, so the ratios it prints hold
on a noisy machine even where the absolute figures do not.
"""

BENCHMARKS = {
    "data": "ich_tune.bench.data",
    "train": "ich_tune.bench.train",
    "search": "ich_tune.bench.search",
    "packing": "ich_tune.bench.packing",
    "predict": "ich_tune.bench.predict",
    "startup": "ich_tune.bench.startup",
}
