"""The config language: includes, merge order, markers, overrides, and every class of error."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ich_tune.config.loader import load_tree
from ich_tune.errors import ConfigError
from ich_tune.experiment import load_experiment, load_search
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[1]


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_include_merge_order(tmp_path):
    write(tmp_path, {
        "base.yaml": "model: {dropout: 0.1, hidden_dims: [8, 8]}\ntrain: {batch_size: 2}\n",
        "mid.yaml": "model: {dropout: 0.2}\noptimizer: {lr: 0.5}\n",
        "top.yaml": "include: [base.yaml, mid.yaml]\noptimizer: {lr: 0.01}\n"
                    "model: {hidden_dims: [4]}\n",
    })
    config, _ = load_experiment(tmp_path / "top.yaml")
    assert config.model.dropout == 0.2  # later include wins over earlier
    assert config.optimizer.lr == 0.01  # the including file wins over its includes
    assert config.model.hidden_dims == [4]  # lists replace, never concatenate
    assert config.train.batch_size == 2  # untouched keys of the first include survive


def test_include_single_path_nested_and_cwd_fallback(tmp_path, monkeypatch):
    write(tmp_path, {"shared/common.yaml": "seed: 7\n",
                     "deep/exp.yaml": "include: shared/common.yaml\n"})
    monkeypatch.chdir(tmp_path)  # not beside exp.yaml: found relative to the working directory
    config, _ = load_experiment(tmp_path / "deep/exp.yaml")
    assert config.seed == 7


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    write(tmp_path, {"e.yaml": "optimizer: {weight_decay: 1e-5}\n"})
    config, _ = load_experiment(tmp_path / "e.yaml")
    assert config.optimizer.weight_decay == pytest.approx(1e-5)


def test_overrides_are_typed_and_validated(tmp_path):
    write(tmp_path, {"e.yaml": "model: {dropout: 0.1}\n"})
    config, _ = load_experiment(tmp_path / "e.yaml", ["model.dropout=0.3", "train.batch_size=16",
                                                      "model.hidden_dims=[8, 16]"])
    assert (config.model.dropout, config.train.batch_size) == (0.3, 16)
    assert config.model.hidden_dims == [8, 16]
    with pytest.raises(ConfigError, match=r"--set model.dropout: key 'model.dropout': expected a num"):
        load_experiment(tmp_path / "e.yaml", ["model.dropout=abc"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_experiment(tmp_path / "e.yaml", ["model.dropout"])


def test_search_overrides_go_to_search_or_experiment(tmp_path):
    write(tmp_path, {"s.yaml": "experiment: {model: {dropout: {choice: [0.1, 0.2]}}}\n"})
    search = load_search(tmp_path / "s.yaml", ["num_train_steps=200", "model.dropout=0.3",
                                               "optimizer.lr={loguniform: {lower: 1e-4, upper: 1e-2}}"])
    assert search.config.num_train_steps == 200
    assert search.experiment["train"]["max_steps"] == 200
    assert [(d.path, d.kind) for d in search.dimensions] == [("optimizer.lr", "loguniform")]
    assert search.trial_experiment({"optimizer.lr": 1e-3}).model.dropout == 0.3


def test_every_marker_compiles_to_a_tune_domain(tmp_path):
    from ray.tune.search.sample import Domain

    markers = {
        "grid_search": "[0.1, 0.2]", "choice": "[0.1, 0.2]", "uniform": "{lower: 0.1, upper: 0.2}",
        "quniform": "{lower: 0.1, upper: 0.5, q: 0.1}", "loguniform": "{lower: 1e-4, upper: 1e-2}",
        "qloguniform": "{lower: 1e-4, upper: 1e-2, q: 1e-4}", "randint": "{lower: 1, upper: 5}",
        "qrandint": "{lower: 2, upper: 8, q: 2}", "lograndint": "{lower: 1, upper: 64}",
        "qlograndint": "{lower: 2, upper: 64, q: 2}", "randn": "{mean: 0.3, sd: 0.01}",
        "qrandn": "{mean: 0.3, sd: 0.01, q: 0.01}",
    }
    for kind, args in markers.items():
        write(tmp_path, {"s.yaml": "num_train_steps: 10\n"
                                   + (f"experiment: {{model: {{dropout: {{{kind}: {args}}}}}}}\n"
                                      if kind not in ("randint", "qrandint", "lograndint", "qlograndint")
                                      else f"experiment: {{train: {{batch_size: {{{kind}: {args}}}}}}}\n")})
        (dim,) = load_search(tmp_path / "s.yaml").dimensions
        domain = dim.to_tune()
        if kind == "grid_search":
            assert domain == {"grid_search": [0.1, 0.2]}
        else:
            assert isinstance(domain, Domain), kind
            value = domain.sample()
            low, high = dim.candidates()[0], dim.candidates()[-1]
            assert kind.endswith("randn") or low <= value <= high, (kind, value)


def test_original_halfres_search_semantics():
    search = load_search(ROOT / "search_spaces/halfres.yaml")
    assert search.num_trials == 60 and search.grid_points == 15
    dims = {d.path: d for d in search.dimensions}
    assert dims["model.dropout"].args == (0.15, 0.2, 0.25)
    assert dims["optimizer.lr"].args == (0.0005, 0.001, 0.01, 0.015, 0.02)
    config = search.trial_experiment({"model.dropout": 0.2, "optimizer.lr": 0.01})
    assert config.model.hidden_dims == [256, 192, 128, 64]
    assert (config.train.batch_size, config.data.lod, config.seed) == (12, 1, 1498)
    assert (config.train.max_steps, config.train.val_batches) == (20000, 1000)
    assert config.loss.objective == "mse" and config.optimizer.weight_decay == 1e-5
    assert search.config.randomize_seed and search.config.num_samples == 4


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml"))
                         + sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_files_resolve(path):
    tree, _ = load_tree(path)
    if "experiment" in tree:
        assert load_search(path).num_trials >= 1
    else:
        load_experiment(path)


BAD_FILES = {
    "unknown key": ("model: {dropot: 0.2}\n", r"e.yaml:1: key 'model.dropot': unknown key. "
                                              r"Did you mean 'dropout'\?"),
    "wrong type": ("train:\n  batch_size: many\n", r"e.yaml:2: key 'train.batch_size': expected an int"),
    "out of range": ("model: {dropout: 1.5}\n", r"key 'model.dropout': 1.5 is outside"),
    "bad literal": ("loss: {objective: hinge}\n", r"'hinge' is not one of 'mse', 'bce'"),
    "lower >= upper": ("model:\n  dropout: {uniform: {lower: 0.3, upper: 0.1}}\n",
                       r"e.yaml:2: key 'model.dropout': 'uniform' needs lower < upper"),
    "empty choice": ("model: {dropout: {choice: []}}\n", r"'choice' needs a non-empty list"),
    "marker mixed": ("model: {dropout: {choice: [0.1], lower: 1}}\n", r"must be the only key"),
    "marker args": ("model: {dropout: {uniform: {lower: 0.1}}}\n", r"missing upper"),
    "missing include": ("include: nope.yaml\n", r"e.yaml:1: included file 'nope.yaml' not found"),
    "malformed": ("model: {dropout: [1\n", r"e.yaml:2: not valid YAML"),
    "duplicate key": ("seed: 1\nseed: 2\n", r"e.yaml:2: key 'seed' appears twice"),
    "not a mapping": ("- 1\n- 2\n", r"must hold a mapping"),
    "include a number": ("seed: 1\ninclude: 3\n",
                         r"e.yaml:2: 'include' takes a path or a list of paths, got 3. Write e.g. "
                         r"`include: base.yaml`"),
    "include a mapping": ("model:\n  include: {path: base.yaml}\n",
                          r"e.yaml:2: 'include' takes a path or a list of paths, got a mapping. Write"),
    "include a list of numbers": ("include: [1, 2]\n", r"e.yaml:1: 'include' .* got \[1, 2\]"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_name_file_line_and_key(tmp_path, name):
    text, pattern = BAD_FILES[name]
    write(tmp_path, {"e.yaml": text})
    loader = load_search if "{" in text and ("choice" in text or "uniform" in text) else None
    with pytest.raises(ConfigError, match=pattern):
        if loader:  # markers belong in a search file's experiment
            write(tmp_path, {"s.yaml": "experiment: {include: e.yaml}\n"})
            load_search(tmp_path / "s.yaml")
        else:
            load_experiment(tmp_path / "e.yaml")


def test_missing_top_level_file(tmp_path):
    for load in (load_experiment, load_search, load_tree):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/nope.yaml: no such file. "
                                              r"Check the path \(a relative path starts in "):
            load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("key, scalar", [("seed.x", "seed"), ("model.dropout.a", "model.dropout"),
                                         ("data.synthetic.studies.n", "data.synthetic.studies"),
                                         ("model.hidden_dims.x", "model.hidden_dims")])
def test_set_into_a_single_value_names_the_flag(tmp_path, key, scalar):
    write(tmp_path, {"e.yaml": "model: {dropout: 0.1}\n", "bare.yaml": "seed: 3\n"})
    for name in ("e.yaml", "bare.yaml"):  # whether or not the file sets the value
        with pytest.raises(ConfigError, match=rf"^--set {re.escape(key)}: key '{re.escape(scalar)}' is "
                                              rf"a single value, not a section of keys, .* e.g. "
                                              rf"--set {re.escape(scalar)}=VALUE.$"):
            load_experiment(tmp_path / name, [f"{key}=1"])


@pytest.mark.parametrize("key, scalar", [("seed.x", "seed"), ("model.dropout.grid_search", "model.dropout"),
                                         ("experiment.seed.x", "experiment.seed"),
                                         ("scheduler.name.x", "scheduler.name")])
def test_set_into_a_single_value_of_a_search(tmp_path, key, scalar):
    write(tmp_path, {"s.yaml": "num_train_steps: 10\n"
                               "experiment: {model: {dropout: {grid_search: [0.1, 0.2]}}}\n"})
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(key)}: key '{re.escape(scalar)}' is a "
                                          r"single value"):
        load_search(tmp_path / "s.yaml", [f"{key}=1"])


def test_set_descends_into_sections_the_file_leaves_unset(tmp_path):
    write(tmp_path, {"e.yaml": "seed: 3\n", "s.yaml": "num_train_steps: 10\nexperiment: {seed: 3}\n"})
    config, _ = load_experiment(tmp_path / "e.yaml", ["data.synthetic.studies=3"])
    assert config.data.synthetic.studies == 3
    search = load_search(tmp_path / "s.yaml", ["experiment.data.synthetic.studies=3",
                                               "scheduler.grace_period=5"])
    assert search.trial_experiment({}).data.synthetic.studies == 3
    assert search.config.scheduler.grace_period == 5


@pytest.mark.parametrize("kind, key, args", [
    ("loguniform", "optimizer.lr", "{lower: 0, upper: 1e-2}"),
    ("qloguniform", "optimizer.lr", "{lower: -1e-4, upper: 1e-2, q: 1e-4}"),
    ("lograndint", "train.batch_size", "{lower: 0, upper: 64}"),
    ("qlograndint", "train.batch_size", "{lower: -2, upper: 64, q: 2}"),
])
def test_log_markers_need_a_positive_lower_bound(tmp_path, kind, key, args):
    section, name = key.split(".")
    write(tmp_path, {"s.yaml": f"num_train_steps: 10\nexperiment:\n  {section}:\n"
                               f"    {name}: {{{kind}: {args}}}\n"})
    linear = kind.replace("log", "")
    with pytest.raises(ConfigError, match=rf"s.yaml:4: key '{key}': '{kind}' samples on a log scale, so it "
                                          rf"needs lower > 0, got -?[0-9.e-]+. Give a positive lower "
                                          rf"bound, or use '{linear}' for a linear scale.$"):
        load_search(tmp_path / "s.yaml")


def test_a_search_without_a_step_budget_is_refused_when_loaded(tmp_path):
    write(tmp_path, {"s.yaml": "experiment: {model: {dropout: {choice: [0.1, 0.2]}}}\n",
                     "budget.yaml": "num_train_steps: 50\nexperiment: {seed: 1}\n"})
    message = rf"^{re.escape(str(tmp_path))}/s.yaml: a search needs a step budget .*`num_train_steps: 20000`"
    with pytest.raises(ConfigError, match=message):
        load_search(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=message.replace("s.yaml", "budget.yaml")):
        load_search(tmp_path / "budget.yaml", ["num_train_steps=null"])
    assert load_search(tmp_path / "s.yaml", ["num_train_steps=30"]).experiment["train"]["max_steps"] == 30
    search = load_search(tmp_path / "s.yaml", ["train.max_steps=40"])  # the experiment's own budget
    assert search.trial_experiment({"model.dropout": 0.1}).train.max_steps == 40


def test_an_unknown_window_is_located_when_the_file_is_loaded(tmp_path):
    write(tmp_path, {"e.yaml": "seed: 1\ndata:\n  channels: [brain, subdurl]\n",
                     "s.yaml": "num_train_steps: 5\nexperiment:\n"
                               "  data: {channels: {choice: [[brain], [bone, x]]}}\n"})
    with pytest.raises(ConfigError, match=r"e.yaml:3: key 'data.channels': unknown window 'subdurl'; did you "
                                          r"mean 'subdural'\?"):
        load_experiment(tmp_path / "e.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml:3: key 'data.channels': unknown window 'x'"):
        load_search(tmp_path / "s.yaml")  # every candidate of a dimension is checked


def test_a_gpu_share_below_rays_step_is_refused(tmp_path):
    write(tmp_path, {"s.yaml": "num_train_steps: 5\nexperiment: {seed: 1}\nresources:\n  gpu: 5.0e-324\n"})
    with pytest.raises(ConfigError, match=r"s.yaml:4: key 'resources.gpu': .* below the smallest share Ray "
                                          r"schedules \(0.0001\); use 0 or a share such as 0.25"):
        load_search(tmp_path / "s.yaml")
    assert load_search(tmp_path / "s.yaml", ["resources.gpu=0.0001"]).config.resources.gpu == 0.0001


def test_include_cycle(tmp_path):
    write(tmp_path, {"a.yaml": "include: b.yaml\n", "b.yaml": "include: [a.yaml]\n"})
    with pytest.raises(ConfigError, match=r"b.yaml:1: include cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_tree(tmp_path / "a.yaml")


def test_optuna_refuses_grid_search_and_suggests_choice(tmp_path):
    write(tmp_path, {"s.yaml": "search_alg: {name: optuna}\n"
                               "experiment: {model: {dropout: {grid_search: [0.1, 0.2]}}}\n"})
    with pytest.raises(ConfigError, match=r"s.yaml:2: .*cannot take grid_search; write `choice: "
                                          r"\[0.1, 0.2\]`"):
        load_search(tmp_path / "s.yaml")


def test_marker_values_are_type_checked_before_any_trial(tmp_path):
    write(tmp_path, {"s.yaml": "experiment:\n  train:\n    batch_size: {grid_search: [4, 8.5]}\n"})
    with pytest.raises(ConfigError, match=r"s.yaml:3: key 'train.batch_size': expected an integer, "
                                          r"got 8.5"):
        load_search(tmp_path / "s.yaml")


def test_markers_refused_in_an_experiment_file(tmp_path):
    write(tmp_path, {"e.yaml": "model: {dropout: {choice: [0.1, 0.2]}}\n"})
    with pytest.raises(ConfigError, match="run it as a search"):
        load_experiment(tmp_path / "e.yaml")


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ich_tune", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_show_config_reports_the_original_sixty_trials():
    result = run_cli("show-config", "search_spaces/halfres.yaml")
    assert result.returncode == 0, result.stderr
    assert "trials: 3 x 5 grid points x 4 samples = 60 trials" in result.stdout
    assert "optimizer.lr   grid_search [0.0005, 0.001, 0.01, 0.015, 0.02]" in result.stdout
    assert "2 CPU, 0.25 GPU (4 trials share one GPU)" in result.stdout
    assert "- 256\n" in result.stdout and "lr: 0.015" not in result.stdout


CLI_ERRORS = {
    "missing file": (["show-config", "nope.yaml"], "nope.yaml: no such file."),
    "set into a value": (["show-config", "e.yaml", "--set", "seed.x=1"],
                         "--set seed.x: key 'seed' is a single value"),
    "no step budget": (["show-config", "s.yaml"], "s.yaml: a search needs a step budget"),  # as `run`
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_config_errors_exit_2_before_anything_starts(tmp_path, case):
    args, expected = CLI_ERRORS[case]
    write(tmp_path, {"e.yaml": "seed: 1\n", "s.yaml": "experiment: {seed: 1}\n"})
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    with Cli(*args, log=tmp_path / "cli.log") as cli:
        assert cli.wait(60) == 2, cli.output
        output = cli.output
    assert output.startswith("error: ") and output.count("\n") == 1, output  # nothing else ran
    assert expected in output and "Traceback" not in output


def test_cli_error_is_one_paragraph_exit_2_no_traceback(tmp_path):
    write(tmp_path, {"e.yaml": "model:\n  dropot: 0.2\n"})
    result = run_cli("show-config", str(tmp_path / "e.yaml"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "e.yaml:2: key 'model.dropot'" in result.stderr
