import pytest
import torch
from torch import nn

from ich_tune.errors import UserError
from ich_tune.models import build_model, count_parameters
from ich_tune.models.resnet import ResNetClassifier2d, ResNetConfig
from ich_tune.training.checkpoint import load_weights


def tiny(**overrides) -> ResNetClassifier2d:
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, hidden_dims=(8, 16, 16), stem_stride=2, dropout=0.2)
    return ResNetClassifier2d(**{**kwargs, **overrides})


def scramble_batchnorm(model: nn.Module) -> None:
    """Non-default running statistics, so a load that skipped buffers would show."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
def test_one_set_of_weights_takes_any_input_size(pooling):
    model = tiny(pooling=pooling).eval()
    for size in (64, 96, 128):
        logits = model(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 6)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
def test_smallest_documented_input_works(pooling):
    # stem_stride 2, three stages -> 2 * 2**2 = 8 pixels
    model = tiny(pooling=pooling).eval()
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 6)


@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
def test_only_3x3_and_1x1_kernels_and_2x2_pooling(pooling):
    model = tiny(pooling=pooling, blocks_per_stage=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    assert {m.kernel_size for m in convs} <= {(3, 3), (1, 1)}
    pools = [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert all(m.kernel_size == 2 and m.stride == 2 for m in pools)
    assert len(pools) == (2 if pooling != "conv" else 0)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_gradient_reaches_every_parameter():
    model = tiny(pooling="conv")
    logits = model(torch.randn(4, 3, 32, 32))
    nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(4, 6)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_build_model_follows_config():
    cfg = ResNetConfig(hidden_dims=[4, 8], blocks_per_stage=2, pooling="avg", stem_stride=4,
                      dropout=0.3, num_classes=5)
    model = build_model(cfg, in_channels=2)
    assert model.stem[0][0].in_channels == 2
    assert model.stem[0][0].stride == (4, 4)
    assert model.head.out_channels == 5
    assert model.dropout.p == 0.3
    assert len(model.stages[0]) == 2
    assert isinstance(model.stages[1][0], nn.AvgPool2d)
    assert model(torch.randn(1, 2, 16, 16)).shape == (1, 5)


def conv_bn_params(kernel_area, in_dim, out_dim):
    return kernel_area * in_dim * out_dim + 2 * out_dim  # conv has no bias; BN has scale and shift


def expected_parameter_count(in_ch, dims, blocks, pooling, classes):
    """Counted from the architecture's description, independently of the module tree."""

    def conv3(i, o):
        return conv_bn_params(9, i, o)

    def conv1(i, o):
        return conv_bn_params(1, i, o)

    total = conv3(in_ch, dims[0])
    width = dims[0]
    for index, dim in enumerate(dims):
        if index > 0 and pooling == "conv":
            total += conv3(width, width)
        for _ in range(blocks):
            total += conv3(width, dim) + conv3(dim, dim)
            total += conv1(width, dim) if width != dim else 0
            width = dim
    return total + width * classes + classes


def test_parameter_count_by_hand():
    # in 1, dims (2, 4), one block, max pooling, 3 classes:
    # stem 9*1*2 + 2*2 = 22; block 2->2: 2*(9*2*2 + 4) = 80;
    # block 2->4: (9*2*4 + 8) + (9*4*4 + 8) + (2*4 + 8) = 80 + 152 + 16 = 248; head 4*3 + 3 = 15
    model = ResNetClassifier2d(1, num_classes=3, hidden_dims=(2, 4))
    assert count_parameters(model) == 22 + 80 + 248 + 15 == 365


@pytest.mark.parametrize("pooling", ["max", "conv"])
def test_parameter_count_by_formula(pooling):
    model = ResNetClassifier2d(3, 6, (16, 32, 64, 128), 1, pooling, stem_stride=2)
    assert count_parameters(model) == expected_parameter_count(3, (16, 32, 64, 128), 1, pooling, 6)
    model = ResNetClassifier2d(2, 4, (4, 4, 8), 2, pooling)
    assert count_parameters(model) == expected_parameter_count(2, (4, 4, 8), 2, pooling, 4)


@pytest.mark.parametrize("as_checkpoint", [False, True])
def test_weights_saved_at_low_resolution_load_for_high_resolution(tmp_path, as_checkpoint):
    trained = tiny()
    trained(torch.randn(4, 3, 32, 32))  # a train-mode pass at low resolution moves BN statistics
    scramble_batchnorm(trained)
    state = trained.state_dict()
    path = tmp_path / "weights.pt"
    torch.save({"model": state, "step": 7} if as_checkpoint else state, path)

    fresh = tiny()
    torch.manual_seed(1)
    for param in fresh.parameters():
        param.data.normal_()
    assert load_weights(fresh, path) == len(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    big = torch.randn(2, 3, 96, 96)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        expected, got = trained(big), fresh(big)
    assert torch.isfinite(got).all()
    assert torch.equal(expected, got)


def test_shape_mismatch_is_a_user_error_naming_file_tensor_and_shapes(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(tiny(hidden_dims=(8, 16, 16)).state_dict(), path)
    with pytest.raises(UserError) as info:
        load_weights(tiny(hidden_dims=(8, 16, 32)), path)
    message = str(info.value)
    assert str(path) in message
    assert "stages.2.1.conv1.0.weight" in message
    assert "(16, 16, 3, 3)" in message and "(32, 16, 3, 3)" in message


def test_missing_and_unexpected_tensors_are_user_errors(tmp_path):
    path = tmp_path / "three_stages.pt"
    torch.save(tiny(hidden_dims=(8, 16, 16)).state_dict(), path)
    with pytest.raises(UserError, match=r"'stages\.3\.1\.conv1\.0\.weight' .* is missing"):
        load_weights(tiny(hidden_dims=(8, 16, 16, 16)), path)
    with pytest.raises(UserError, match=r"'stages\.2\.1\.conv1\.0\.weight' has no place"):
        load_weights(tiny(hidden_dims=(8, 16)), path)


def test_unreadable_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tiny(), tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_weights(tiny(), junk)
