"""The preprocessed data on every node that runs trials, prepared there before its first trial.

Building a cache takes a node's every core for minutes (hours for the whole RSNA set), so it never
happens inside a trial, which holds only its own share of the node. One coordinator, an actor on
the driver's node, prepares each node once with a task pinned to it (NodeAffinitySchedulingStrategy)
that uses that node's cores: every alive node that can hold a trial before the search starts, and a
node that joins later as soon as its first trial asks. A trial waits for its node's preparation and
then only opens the cache; where preparing failed, or the cache has gone since, it fails with one
line saying so.

Why trials ask rather than a callback that watches for new nodes: Tune keeps placement groups
pending for waiting trials, and Ray places one on a new node the moment that node registers, before
any driver-side callback runs, so only the trial knows for sure that it landed on an unprepared
node. (A custom resource that only prepared nodes offer would keep trials away, but Ray cannot add
one to a running node.)

With a `data.cache_dir` shared by the nodes, each finds the cache built, or waits on the build's
file lock (data/cache.py), and builds nothing itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ich_tune.config.markers import LISTS
from ich_tune.config.schema import DataConfig, where
from ich_tune.data.cache import cache_params
from ich_tune.data.prepare import prepare_cache
from ich_tune.errors import ConfigError, UserError
from ich_tune.experiment import Search
from ich_tune.logs import to_stdout
from ich_tune.search.driver_log import driver_log
from ich_tune.search.worker_output import output_to

log = logging.getLogger(__name__)


def cache_identity(data: DataConfig) -> str:
    """What picks a cache: its parameters, where caches live, and how synthetic data are written."""
    synthetic = dataclasses.asdict(data.synthetic) if data.synthetic else None
    return json.dumps([cache_params(data, Path(data.root or ".")), data.cache_dir, synthetic], sort_keys=True)


def data_variants(search: Search, experiment: dict) -> list[DataConfig]:
    """The data settings of the search's trials that need caches of their own: every combination of
    the listed values of its searched `data` keys. A key that changes the cache cannot be sampled from
    a range: every node prepares its caches before the trials draw their values."""
    first = search.first_values

    def data_of(values: dict) -> DataConfig:
        return search.trial_experiment(first | values, experiment).data

    dims = [d for d in search.dimensions if d.path == "data" or d.path.startswith("data.")]
    for d in dims:
        if d.kind not in LISTS and len({cache_identity(data_of({d.path: v})) for v in d.candidates()}) > 1:
            raise ConfigError(f"{where(d.path, search.origins)}: {d.describe()} changes the preprocessed "
                              "cache, which every node prepares before the trials start; list the values "
                              "instead (choice: [...] or grid_search: [...]).")
    listed = [d for d in dims if d.kind in LISTS]
    variants: dict[str, DataConfig] = {}
    for values in itertools.product(*(d.args for d in listed)):
        data = data_of({d.path: v for d, v in zip(listed, values, strict=True)})
        variants.setdefault(cache_identity(data), data)
    return list(variants.values())


@dataclass
class NodeCaches:
    """One node's caches, by cache_identity, or why they could not be prepared there."""

    node: str  # for messages: its address and the start of its id
    paths: dict[str, str]
    error: str | None = None
    said: str = ""  # what preparing printed (ich_tune's own lines), where the driver asked for it
    progress: str = ""  # ... and its stderr: progress bars, the libraries' warnings


@ray.remote(num_cpus=0, max_retries=0)
def _prepare_here(variants: list[DataConfig], cpus: int, rescan: bool,
                  capture: bool) -> tuple[list[tuple[str, str]], str, str]:
    """Every cache on the node this task is pinned to, one after another, each with that node's cores
    (Ray's count, which a container's limit sets, unlike os.cpu_count) unless data.workers says;
    `rescan` (run --rescan) checks every file of the data on each node. With `capture`, what it
    prints comes back with the paths (stdout, stderr) instead of through Ray's forwarding.

    It asks Ray for no CPU: on a node that joined late, waiting trials already hold them all."""
    to_stdout()  # what the build logs goes to this task's output
    if not capture:
        return _prepare(variants, cpus, rescan), "", ""
    with tempfile.TemporaryDirectory(prefix="ich_tune-prepare-") as folder:
        said, progress = Path(folder, "stdout"), Path(folder, "stderr")
        with output_to(said, progress):
            paths = _prepare(variants, cpus, rescan)
        return paths, said.read_text(errors="replace"), progress.read_text(errors="replace")


def _prepare(variants: list[DataConfig], cpus: int, rescan: bool) -> list[tuple[str, str]]:
    built = [prepare_cache(dataclasses.replace(data, workers=data.workers or cpus), rescan=rescan)
             for data in variants]
    return [(cache_identity(data), str(path)) for data, path in zip(variants, built, strict=True)]


@ray.remote(num_cpus=0)
class _Preparer:
    """Starts the preparation of each cache on each node once, and answers everyone who waits for it.

    One per search, not shared by name: a handle that get_if_exists hands over does not keep a named
    actor alive, so a later search in the same process lost it when the first one's handles went."""

    def __init__(self, capture: bool) -> None:
        self.runs: dict[tuple[str, str], ray.ObjectRef] = {}  # (node id, cache identity) -> its task
        self.capture = capture  # preparing tasks return their output rather than print it

    async def ready(self, node_id: str, variants: list[DataConfig], rescan: bool) -> NodeCaches:
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        name = f"{node['NodeManagerAddress']} ({node_id[:8]})"
        missing = [data for data in variants if (node_id, cache_identity(data)) not in self.runs]
        if missing:
            there = NodeAffinitySchedulingStrategy(node_id, soft=False)
            cpus = max(1, int(node["Resources"].get("CPU", 1)))
            run = _prepare_here.options(scheduling_strategy=there).remote(missing, cpus, rescan, self.capture)
            self.runs |= {(node_id, cache_identity(data)): run for data in missing}
        caches = NodeCaches(name, {})
        for run in {self.runs[node_id, cache_identity(data)] for data in variants}:
            try:
                paths, said, progress = await run
            except ray.exceptions.RayError as err:  # the task's own error, or its node or worker died
                # forgotten, so that the next ask prepares again once the cause (a full disk, a missing
                # mount) is fixed, instead of failing every later trial on this node
                self.runs = {key: other for key, other in self.runs.items() if other != run}
                cause = getattr(err, "cause", None) or err
                return NodeCaches(name, {}, str(cause).strip().splitlines()[0])
            caches.paths |= dict(paths)
            caches.said += said
            caches.progress += progress
        return caches


class DataOnNodes:
    """The handle trials get (through tune.with_parameters) to the coordinator of every node's caches."""

    def __init__(self, variants: list[DataConfig], rescan: bool = False, capture: bool = False) -> None:
        """`capture`: what preparing prints comes to the driver's log (the node's progress bars to its
        log file) instead of through Ray's forwarding of worker output, which is off then."""
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.preparer = _Preparer.options(scheduling_strategy=here).remote(capture)
        self.variants = variants
        self.rescan = rescan  # each node checks every file of its data once, when it is prepared

    def prepare(self, resources: dict[str, float]) -> None:
        """Before the search: every alive node with room for one trial of `resources` ({cpu, gpu})."""
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = [n["NodeID"] for n in alive if n["Resources"].get("CPU", 0) >= resources["cpu"]
                 and n["Resources"].get("GPU", 0) >= resources["gpu"]]
        if not nodes:  # Tune would wait forever for a node that fits
            largest = max((n["Resources"] for n in alive), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
            cpu, gpu = largest.get("CPU", 0), largest.get("GPU", 0)
            raise UserError(f"no node of this Ray cluster can run a trial: each asks for "
                            f"{resources['cpu']:g} CPU and {resources['gpu']:g} GPU (resources.cpu, "
                            f"resources.gpu); the largest node has {cpu:g} CPU and {gpu:g} GPU. Lower "
                            "resources, or add a node that large.")
        count = len(self.variants)
        log.info(f"data: preparing {count} cache{'s' if count > 1 else ''} on each of {len(nodes)} node(s) "
                 "that can run trials")
        asks = [self.preparer.ready.remote(node, self.variants, self.rescan) for node in nodes]
        for caches in ray.get(asks):
            if caches.error:
                raise UserError(f"data on node {caches.node}: {caches.error}")
            for line in caches.said.splitlines():
                log.info(line)
            if caches.progress:
                driver_log().info(f"data on node {caches.node}:\n{caches.progress.rstrip()}")
            log.info(f"data: node {caches.node} ready: {', '.join(sorted(set(caches.paths.values())))}")

    def cache_for(self, data: DataConfig) -> Path:
        """In a trial: this node's cache for `data`, once the node is prepared. Never builds one."""
        node_id = ray.get_runtime_context().get_node_id()
        caches = ray.get(self.preparer.ready.remote(node_id, self.variants, self.rescan))
        missing = f"no preprocessed data on node {caches.node}"
        if caches.error:
            raise RuntimeError(f"{missing}: preparing it failed: {caches.error}")
        path = caches.paths.get(cache_identity(data))
        if path is None:
            raise RuntimeError(f"{missing} for this trial's data settings: they were not among those "
                               "prepared before the search started")
        if not (Path(path) / "manifest.json").is_file():
            raise RuntimeError(f"{missing}: {path} was removed after the node was prepared; trials never "
                               "preprocess, so resume the search (--resume) to prepare it again")
        return Path(path)
