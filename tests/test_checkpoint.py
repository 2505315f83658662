"""Saved models describe themselves; a model family is one file that registers itself."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ich_tune import models
from ich_tune.config import schema
from ich_tune.config.schema import ModelConfig, bounded
from ich_tune.data.prepare import prepare_cache
from ich_tune.errors import ConfigError, UserError
from ich_tune.experiment import build_experiment
from ich_tune.models import build_model
from ich_tune.models.resnet import ResNetClassifier2d
from ich_tune.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ich_tune.training.loop import train
from tests.conftest import tiny_tree


@pytest.fixture
def tiny_family(monkeypatch):
    """A second family, as a new file under ich_tune/models/ would define it (registered for this test
    only): a 1x1 convolution of `width` features, global mean, linear head."""
    monkeypatch.setattr(models, "FAMILIES", dict(models.FAMILIES))
    monkeypatch.setattr(schema, "MODEL_FAMILIES", dict(schema.MODEL_FAMILIES))

    @dataclass
    class TinyConfig(ModelConfig):
        width: int = bounded(4, 1)

    @models.register(TinyConfig)
    class TinyNet(nn.Module):
        def __init__(self, in_channels: int, num_classes: int = 6, width: int = 4) -> None:
            super().__init__()
            self.features = nn.Conv2d(in_channels, width, 1)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))

    return TinyNet


def test_a_new_family_is_one_file_plus_a_config(tiny_family, tiny_rsna, tmp_path):
    tree = tiny_tree(tiny_rsna, tmp_path / "cache", model={"name": "TinyNet", "width": 3})
    del tree["model"]["hidden_dims"], tree["model"]["dropout"]  # the ResNet's arguments, not TinyNet's
    config = build_experiment(tree, {})
    assert type(config.model).__name__ == "TinyConfig" and config.model.width == 3
    outcome = train(config, prepare_cache(config.data), tmp_path / "out")
    assert isinstance(outcome.model, tiny_family)

    save_checkpoint(tmp_path / "weights.pt", config, outcome.model)
    saved = load_checkpoint(tmp_path / "weights.pt")
    assert saved.model == {"name": "TinyNet", "num_classes": 6, "width": 3}
    rebuilt = saved.build()
    assert isinstance(rebuilt, tiny_family)
    for name, tensor in outcome.model.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name])

    with pytest.raises(ConfigError, match=r"key 'model.width': 0 is outside"):
        build_experiment({**tree, "model": {"name": "TinyNet", "width": 0}}, {})
    with pytest.raises(ConfigError, match=r"key 'model.hidden_dims': unknown key"):
        build_experiment({**tree, "model": {"name": "TinyNet", "hidden_dims": [8]}}, {})


def test_an_unknown_family_is_named_with_the_closest(tiny_rsna, tmp_path):
    tree = tiny_tree(tiny_rsna, tmp_path / "cache", model={"name": "ResNetClassifer2d"})
    with pytest.raises(ConfigError, match=r"key 'model.name': unknown model family 'ResNetClassifer2d'. "
                                          r"Did you mean 'ResNetClassifier2d'\?"):
        build_experiment(tree, {})


def test_2d_weights_start_a_2_5d_model_that_computes_the_same_on_the_centre_slice(tmp_path):
    torch.manual_seed(0)
    flat = ResNetClassifier2d(3, hidden_dims=(4, 8), dropout=0.0).eval()
    torch.save(flat.state_dict(), tmp_path / "flat.pt")  # a plain state dict, as older versions wrote
    deep = ResNetClassifier2d(9, hidden_dims=(4, 8), dropout=0.0).eval()  # context 1: 3 slices x 3
    assert load_weights(deep, tmp_path / "flat.pt") == len(flat.state_dict())
    stem = deep.stem[0][0].weight
    assert torch.equal(stem[:, 3:6], flat.stem[0][0].weight)  # the centre slice's windows
    assert not stem[:, :3].any() and not stem[:, 6:].any()
    centre = torch.randn(2, 3, 16, 16)
    neighbours = torch.cat([torch.randn(2, 3, 16, 16), centre, torch.randn(2, 3, 16, 16)], dim=1)
    with torch.no_grad():
        assert torch.allclose(deep(neighbours), flat(centre), atol=1e-6)


def test_a_plain_state_dict_still_loads_but_cannot_rebuild_itself(tmp_path):
    model = ResNetClassifier2d(3, hidden_dims=(4,))
    torch.save(model.state_dict(), tmp_path / "old.pt")
    saved = load_checkpoint(tmp_path / "old.pt")
    assert saved.model is None and saved.experiment is None
    assert load_weights(ResNetClassifier2d(3, hidden_dims=(4,)), tmp_path / "old.pt") == len(saved.state_dict)
    with pytest.raises(UserError, match="a plain state dict without its model description"):
        saved.build()
    with pytest.raises(UserError, match=r"tensor 'stem.0.0.weight' has shape \(4, 3, 3, 3\) in the file "
                                        r"but \(8, 3, 3, 3\) in the model"):
        load_weights(build_model(build_experiment({"model": {"hidden_dims": [8]}}, {}).model, 3),
                     tmp_path / "old.pt")
