from itertools import pairwise

import pytest
import torch

from ich_tune.config.schema import OptimizerConfig, ScheduleConfig
from ich_tune.training.optim import make_loss, make_lr_schedule, make_optimizer

LOGITS = torch.tensor([[0.0, 2.0, -1.0, 0.5, -3.0, 1.0],
                       [1.0, -2.0, 0.0, 0.0, 3.0, -0.5]])
TARGETS = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0],
                        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
# Worked by hand, element by element, LOGITS row 0 then row 1:
#   sigmoid:          .5       .8807971 .2689414 .6224593 .0474259 .7310586
#                     .7310586 .1192029 .5       .5       .9525741 .3775407
#   (p - target)^2:   .25      .0142093 .0723295 .1425370 .0022492 .0723295  sum .5536545
#                     .0723295 .0142093 .25      .25      .0022492 .1425370  sum .7313250
#   BCE, ln(1 + e^-x) for target 1 and ln(1 + e^x) for target 0:
#                     .6931472 .1269280 .3132617 .4740770 .0485874 .3132617  sum 1.9692629
#                     .3132617 .1269280 .6931472 .6931472 .0485874 .4740770  sum 2.3491484


def test_mse_is_squared_error_of_probabilities():
    # (0.5536545 + 0.7313250) / 12 = 1.2849795 / 12
    assert make_loss("mse")(LOGITS, TARGETS).item() == pytest.approx(0.1070816, abs=1e-6)


def test_mse_by_hand():
    # sigmoid(0) = 0.5 everywhere: (0.5 - 1)^2 = (0.5 - 0)^2 = 0.25
    loss = make_loss("mse")(torch.zeros(3, 6), torch.randint(0, 2, (3, 6)).float())
    assert loss.item() == pytest.approx(0.25)


def test_bce_is_mean_cross_entropy_of_probabilities():
    # (1.9692629 + 2.3491484) / 12 = 4.3184113 / 12
    assert make_loss("bce")(LOGITS, TARGETS).item() == pytest.approx(0.3598676, abs=1e-6)
    # logit 0 -> every term is ln 2
    assert make_loss("bce")(torch.zeros(2, 6), TARGETS).item() == pytest.approx(0.6931472, abs=1e-6)


def test_weighted_bce_counts_any_twice_out_of_seven():
    # row 0: (1.9692629 + .3132617) / 7 = 0.3260749; row 1: (2.3491484 + .4740770) / 7 = 0.4033179
    assert make_loss("weighted_bce")(LOGITS, TARGETS).item() == pytest.approx(0.3646964, abs=1e-6)

    # Only `any` wrong: its BCE (ln 2 at logit 0) enters with weight 2 of 7: 2 x 0.6931472 / 7.
    logits = torch.full((1, 6), -30.0)
    logits[0, 5] = 0.0
    loss = make_loss("weighted_bce")(logits, torch.zeros(1, 6))
    assert loss.item() == pytest.approx(0.1980421, abs=1e-6)


def test_losses_give_gradients_and_reject_unknown_names():
    for name in ("mse", "bce", "weighted_bce"):
        logits = LOGITS.clone().requires_grad_()
        make_loss(name)(logits, TARGETS).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="focal"):
        make_loss("focal")


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizer_hyperparameters(name, cls):
    cfg = OptimizerConfig(name=name, lr=0.015, weight_decay=1e-5, momentum=0.8)
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = make_optimizer(cfg, params)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.015 and group["weight_decay"] == 1e-5
    assert group["params"] == params
    if name == "sgd":
        assert group["momentum"] == 0.8 and group["nesterov"] is False


def schedule(decay: str, warmup: int, total: int, lr: float = 0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return optimizer, make_lr_schedule(optimizer, ScheduleConfig(warmup, decay), total)


def lrs(optimizer, lr_schedule, steps: int) -> list[float]:
    """The lr each of the next `steps` optimizer steps uses."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_schedule.step()
    return seen


def test_warmup_then_constant():
    seen = lrs(*schedule("constant", warmup=4, total=10), 10)
    # step s < 4 uses lr * (s + 1) / 4
    assert seen[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert seen[4:] == pytest.approx([0.1] * 6)


def test_warmup_then_cosine_to_zero():
    seen = lrs(*schedule("cosine", warmup=4, total=12), 14)
    assert seen[0] == pytest.approx(0.025)  # step 0: lr / warmup_steps
    assert seen[1] == pytest.approx(0.05)  # mid-warmup
    assert seen[3] == pytest.approx(0.1)  # last warmup step: the full lr
    assert seen[4] == pytest.approx(0.1)  # decay starts at 1
    assert seen[8] == pytest.approx(0.05)  # half-way through the 8 decay steps: cos(pi/2)
    assert seen[11] == pytest.approx(0.0038060, abs=1e-7)  # 0.05 * (1 + cos(7 pi / 8)) = 0.05 * 0.0761205
    assert seen[12] == pytest.approx(0.0, abs=1e-12)  # step total_steps: zero, and it stays there
    assert seen[13] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in pairwise(seen[3:]))


def test_no_warmup_starts_at_full_lr():
    seen = lrs(*schedule("cosine", warmup=0, total=4), 4)
    # 0.05 * (1 + cos(s pi / 4)) for s = 0..3: cos = 1, 0.7071068, 0, -0.7071068
    assert seen == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], abs=1e-7)


def test_schedule_resumes_from_state_dict():
    optimizer, lr_schedule = schedule("cosine", warmup=3, total=20)
    lrs(optimizer, lr_schedule, 7)
    saved = optimizer.state_dict(), lr_schedule.state_dict()
    expected = lrs(optimizer, lr_schedule, 13)

    resumed_optimizer, resumed_lr_schedule = schedule("cosine", warmup=3, total=20)
    resumed_optimizer.load_state_dict(saved[0])
    resumed_lr_schedule.load_state_dict(saved[1])
    assert lrs(resumed_optimizer, resumed_lr_schedule, 13) == pytest.approx(expected)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="total_steps"):
        schedule("cosine", warmup=0, total=0)
    with pytest.raises(ValueError, match="linear"):
        schedule("linear", warmup=0, total=10)
