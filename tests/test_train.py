"""The training loop on real DICOM data: budget, validation, exact resume, divergence, init_from."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ich_tune.data.prepare import prepare_cache
from ich_tune.training.checkpoint import load_checkpoint
from ich_tune.training.loop import CHECKPOINT_FILE, HPARAM_METRICS, LossNotFinite, train, write_hparams

ROOT = Path(__file__).resolve().parents[1]


def collect_reports(into: list, keep: Path):
    """A report hook that keeps a copy of each checkpoint (train deletes its own after reporting)."""
    def report(metrics: dict, folder: Path | None) -> None:
        copy = None
        if folder is not None:
            copy = keep / folder.name
            shutil.copytree(folder, copy)
        into.append((metrics, copy))
    return report


def test_validates_on_schedule_and_reports_stable_metric_names(tiny_config, tmp_path):
    config = tiny_config(train={"max_steps": 7, "val_interval": 3})
    reports = []
    outcome = train(config, prepare_cache(config.data), tmp_path / "out",
                    report=collect_reports(reports, tmp_path / "kept"))
    assert [m["step"] for m, _ in reports] == [3, 6, 7]  # every val_interval, and at the end
    assert all(c is not None and (c / CHECKPOINT_FILE).is_file() for _, c in reports)
    metrics = reports[-1][0]
    for key in ("val_accuracy", "val_accuracy_baseline", "val_accuracy_relative", "val_accuracy_any",
                "val_auc_any", "val_auc_mean", "val_log_loss", "val_sensitivity_subdural",
                "val_specificity_any"):
        assert key in metrics, key
    assert 0.0 <= metrics["val_accuracy_baseline"] <= 1.0
    assert outcome.steps == 7 and outcome.metrics == metrics
    assert not list((tmp_path / "out").glob("checkpoint_*"))  # handed to the reporter, not kept


def test_resumed_run_continues_exactly(tiny_config, tmp_path):
    config = tiny_config(train={"max_steps": 6, "val_interval": 3}, data={"augment": True})
    cache = prepare_cache(config.data)
    straight = train(config, cache, tmp_path / "a")
    reports = []
    train(config, cache, tmp_path / "b", report=collect_reports(reports, tmp_path / "kept"))
    halfway = reports[0][1]  # the checkpoint at step 3
    resumed = train(config, cache, tmp_path / "c", resume_from=halfway)
    assert resumed.steps == 6 and [h["step"] for h in resumed.history] == [3, 6]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.metrics["val_log_loss"] == pytest.approx(straight.metrics["val_log_loss"], abs=1e-6)


def test_a_local_run_keeps_only_its_latest_checkpoint(tiny_config, tmp_path):
    config = tiny_config(train={"max_steps": 6, "val_interval": 2})
    train(config, prepare_cache(config.data), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").glob("checkpoint_*")] == ["checkpoint_0000006"]


def test_diverging_loss_stops_with_a_clear_message(tiny_config, tmp_path):
    config = tiny_config(optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0},
                         schedule={"warmup_steps": 0}, train={"max_steps": 20})
    with pytest.raises(LossNotFinite, match=r"step \d+: the training loss is (nan|inf).*Lower optimizer.lr"):
        train(config, prepare_cache(config.data), tmp_path / "out")


def test_init_from_loads_weights_trained_at_another_resolution(tiny_config, tmp_path, said):
    low = tiny_config(data={"lod": 1})  # 32x32
    trained = train(low, prepare_cache(low.data), tmp_path / "low")
    weights = tmp_path / "low.pt"
    torch.save(trained.model.state_dict(), weights)
    high = tiny_config(data={"lod": 0}, model={"init_from": str(weights)}, train={"max_steps": 1})
    # a learning rate of zero leaves the loaded weights untouched through one step
    high.optimizer.lr = 0.0
    started = train(high, prepare_cache(high.data), tmp_path / "high")
    assert any("tensors loaded from" in line for line in said)
    for name, tensor in trained.model.state_dict().items():
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics move in training mode even at lr 0
        assert torch.equal(tensor, started.model.state_dict()[name]), name
    assert started.metrics["val_log_loss"] == started.metrics["val_log_loss"]  # finite, not NaN


def test_train_command_prints_metrics_and_saves_weights(tiny_rsna, tmp_path):
    from tests.conftest import tiny_tree

    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(tiny_tree(tiny_rsna, tmp_path / "cache")))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "ich_tune", "train", str(experiment), "--out", str(out),
                             "--set", "train.max_steps=4"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "all-neg" in result.stdout and "AUC" in result.stdout
    saved = load_checkpoint(out / "weights.pt")  # describes itself: family, arguments, input, experiment
    assert saved.model == {"name": "ResNetClassifier2d", "num_classes": 6, "hidden_dims": [8, 16],
                           "blocks_per_stage": 1, "pooling": "max", "stem_stride": 1, "dropout": 0.1}
    assert saved.input == {"channels": ["brain", "subdural", "bone"], "size": 32, "context": 0,
                           "in_channels": 3}
    assert saved.experiment["train"]["max_steps"] == 4 and saved.training is None
    model = saved.build().eval()
    assert torch.equal(model.state_dict()["head.weight"], saved.state_dict["head.weight"])
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4


def test_hparams_name_the_values_and_the_scalars_training_writes(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = tiny_config(logging={"tensorboard": True})
    write_hparams(tmp_path / "tb", {"optimizer.lr": 0.003, "model.hidden_dims": [8, 16]})
    train(config, prepare_cache(config.data), tmp_path / "out", tensorboard_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["optimizer.lr"].number_value == 0.003
    assert session.session_start_info.hparams["model.hidden_dims"].string_value == "[8, 16]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert set(HPARAM_METRICS) <= set(events.Tags()["scalars"])  # every column has its series
