"""`prism.dist.ModelUpdate`, the one update path, on one process (2-process equivalence: test_distributed):
micro-batch shares of the global mean accumulate to the full-batch gradient, the norm is read before
clipping, and a non-finite value stops the step before the optimizer moves anything."""

from __future__ import annotations

import pytest
import torch

from prism.core.errors import NonFiniteLossError
from prism.dist import ModelUpdate, make_accelerator, prepare, reduce_mean, reduce_sum


def _setup(replicated: bool, max_grad_norm):
    torch.manual_seed(0)
    acc = make_accelerator(cpu=True)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if replicated:
        params = list(model.parameters())
    else:
        model, opt, params = prepare(acc, model, opt, 2)
    return acc, model, opt, ModelUpdate(acc, model, opt, params, max_grad_norm, replicated=replicated)


@pytest.mark.parametrize("replicated", [False, True])
def test_micro_batch_shares_accumulate_to_the_full_batch_gradient_and_step(replicated):
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    acc, model, opt, update = _setup(replicated, max_grad_norm=None)
    w0 = model.weight.detach().clone().requires_grad_()
    full = ((x @ w0.T - y) ** 2).mean()
    (expected,) = torch.autograd.grad(full, w0)
    w0 = w0.detach()
    for m, rows in enumerate((slice(0, 2), slice(2, 6))):
        with update.micro_batch(last=m == 1):
            update.backward(((model(x[rows]) - y[rows]) ** 2).sum() / 6)  # this micro-batch's share of the mean
    torch.testing.assert_close(model.weight.grad, expected)
    norm = update.step(1, loss=float(full.detach()))
    assert norm != norm  # NaN: not clipping, so no norm is computed
    torch.testing.assert_close(model.weight.detach(), w0 - expected)  # SGD, lr 1
    assert model.weight.grad is None  # zeroed for the next step


@pytest.mark.parametrize("replicated", [False, True])
def test_the_norm_is_read_before_clipping(replicated):
    acc, model, opt, update = _setup(replicated, max_grad_norm=0.5)
    w0 = model.weight.detach().clone()
    update.backward(model(torch.ones(1, 3)).sum() * 10)  # gradient 10 * (1, 1, 1)
    assert update.step(1) == pytest.approx(10 * 3 ** 0.5)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.5 / 3 ** 0.5)  # clipped to norm 0.5


def test_a_non_finite_loss_or_gradient_stops_before_the_optimizer_moves():
    acc, model, opt, update = _setup(False, max_grad_norm=1.0)
    w0 = model.weight.detach().clone()
    update.backward(model(torch.ones(1, 3)).sum())
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 7"):
        update.step(7, loss=float("nan"))
    update.zero_grad()
    update.backward(model(torch.full((1, 3), float("inf"))).sum())
    with pytest.raises(NonFiniteLossError, match="grad_norm"):
        update.step(8, loss=1.0)
    torch.testing.assert_close(model.weight.detach(), w0)


def test_reductions_over_one_process_are_the_identity():
    acc = make_accelerator(cpu=True)
    metrics = {"rollout/a": 1.5, "actor/b": 2.0}
    assert reduce_mean(acc, metrics, ("rollout/",)) == metrics
    assert reduce_sum(acc, torch.tensor(3)) == 3.0


@pytest.mark.parametrize("replicated", [False, True])
def test_an_update_that_changes_the_parameter_norm_too_much_stops_the_run(replicated):
    from prism.core.errors import DivergenceError

    acc = make_accelerator(cpu=True)
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))  # ‖θ‖ = 5
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    params = list(model.parameters())
    if not replicated:
        model, opt, params = prepare(acc, model, opt, 2)
    update = ModelUpdate(acc, model, opt, params, None, replicated=replicated, max_change=0.5, name="discriminator",
                         lr_key="discriminator.lr")
    update.backward(model(torch.tensor([[-1.0, -1.0]])).sum())  # gradient (-1, -1): θ -> (4, 5)
    update.step(1)
    assert update.last_change == pytest.approx((41 ** 0.5 - 5) / 5)  # 0.28: under the limit
    update.backward(model(torch.tensor([[-3.0, -3.0]])).sum())  # θ -> (7, 8): ‖θ‖ from √41 to √113
    with pytest.raises(DivergenceError, match=r"^step 2: the discriminator update blew up: .* from 6.403 to 10.63 "
                       r"\(a relative change of 0.66, over optim.max_param_change=0.5\); lower discriminator.lr \(now 1\)$"):
        update.step(2)
