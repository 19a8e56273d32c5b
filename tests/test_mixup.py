"""Mixup: what is mixed (the input, or the hidden state at the drawn layer), with what (one
lambda and one permutation per batch, shared by inputs and targets), and the two losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kmnist_torch.models.registry import create_model
from kmnist_torch.training import mixup

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _capture(module: torch.nn.Module, store: dict, key: str, pre: bool) -> None:
    """Keep the input (pre) or output of ``module`` in ``store[key]``."""
    if pre:
        module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach()))
    else:
        module.register_forward_hook(lambda m, a, out: store.__setitem__(key, out.detach()))


# Where each model's mixable hidden states come out of (producer) and go into (consumer).
HIDDEN = {
    "preact18": {1: ("layer1", "layer2"), 2: ("layer2", "layer3")},
    "simple_cnn": {1: ("conv1", "conv2"), 2: ("conv2", "drop1")},
}
FIRST = {"preact18": "conv1", "simple_cnn": "conv1"}


@pytest.mark.parametrize("name", ["preact18", "simple_cnn"])
@pytest.mark.parametrize("layer", [1, 2])
def test_manifold_mixup_mixes_the_hidden_state_at_the_drawn_layer(name, layer):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()  # eval: dropout off, so hooks compare
    x = torch.rand(6, 1, 28, 28)
    y = torch.arange(6)
    seen: dict = {}
    producer, consumer = HIDDEN[name][layer]
    _capture(getattr(model, producer), seen, "out", pre=False)
    _capture(getattr(model, consumer), seen, "in", pre=True)
    _capture(getattr(model, FIRST[name]), seen, "x", pre=True)
    plan = mixup.MixPlan(0.3, torch.tensor([5, 0, 4, 1, 3, 2]), layer)
    with torch.no_grad():
        _, soft = mixup.mixed_forward(model, x, y, 10, plan)
    h = seen["out"]
    if name == "simple_cnn":  # the hidden states are the ReLU (and pool) outputs
        h = F.relu(h) if layer == 1 else F.max_pool2d(F.relu(h), 2)
    expected = 0.3 * h + 0.7 * h[plan.perm]
    torch.testing.assert_close(seen["in"], expected)
    assert not torch.allclose(seen["in"], h)
    assert torch.equal(seen["x"], x)  # the input itself is left alone
    # The targets are mixed with the very same lambda and permutation.
    onehot = F.one_hot(y, 10).float()
    torch.testing.assert_close(soft, 0.3 * onehot + 0.7 * onehot[plan.perm])


@pytest.mark.parametrize("name", ["preact18", "simple_cnn"])
def test_input_mixup_mixes_the_input_only(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    seen: dict = {}
    _capture(getattr(model, FIRST[name]), seen, "x", pre=True)
    producer, consumer = HIDDEN[name][1]
    _capture(getattr(model, producer), seen, "out", pre=False)
    _capture(getattr(model, consumer), seen, "in", pre=True)
    plan = mixup.MixPlan(0.8, torch.tensor([2, 3, 0, 1]), 0)
    with torch.no_grad():
        _, soft = mixup.mixed_forward(model, x, y, 10, plan)
    torch.testing.assert_close(seen["x"], 0.8 * x + 0.2 * x[plan.perm])
    h = seen["out"] if name == "preact18" else F.relu(seen["out"])
    torch.testing.assert_close(seen["in"], h)  # nothing further down is mixed
    onehot = F.one_hot(y, 10).float()
    torch.testing.assert_close(soft, 0.8 * onehot + 0.2 * onehot[plan.perm])


def test_no_mixup_gives_plain_one_hot_targets():
    model = create_model("simple_cnn", 10).eval()
    y = torch.tensor([3, 1])
    logits, soft = mixup.mixed_forward(model, torch.rand(2, 1, 28, 28), y, 10, None)
    assert logits.shape == (2, 10)
    assert torch.equal(soft, F.one_hot(y, 10).float())


def test_draw_one_lambda_and_one_permutation_per_batch():
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    plan = mixup.draw("manifold", 2.0, 16, (0, 1, 2), rng, gen)
    assert 0.0 <= plan.lam <= 1.0 and isinstance(plan.lam, float)
    assert sorted(plan.perm.tolist()) == list(range(16))
    assert plan.layer in (0, 1, 2)
    assert mixup.draw("none", 2.0, 16, (0, 1, 2), rng, gen) is None
    assert mixup.draw("input", 1.0, 4, (0, 1, 2), rng, gen).layer == 0
    assert mixup.draw("input", 0.0, 4, (0, 1, 2), rng, gen).lam == 1.0  # alpha 0: no mixing
    with pytest.raises(ValueError, match="mixup mode must be one of"):
        mixup.draw("cutmix", 1.0, 4, (0,), rng, gen)
    with pytest.raises(ValueError, match="no layer for manifold mixup"):
        mixup.draw("manifold", 1.0, 4, (3, 4), rng, gen)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_lambda_follows_beta_and_layers_are_uniform(alpha):
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    plans = [mixup.draw("manifold", alpha, 2, (0, 1, 2), rng, gen) for _ in range(4000)]
    lams = np.array([p.lam for p in plans])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    assert lams.mean() == pytest.approx(0.5, abs=0.02)
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    counts = np.bincount([p.layer for p in plans], minlength=3)
    assert counts.min() > 1200 and counts.max() < 1470  # 1333 each, +-3.5 sigma
    assert len({tuple(p.perm.tolist()) for p in plans[:10]}) > 1  # a new pairing per batch


def test_draw_is_reproducible_from_its_generators():
    def plans(seed):
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        return [mixup.draw("manifold", 2.0, 8, (0, 1, 2), rng, gen) for _ in range(5)]

    a, b = plans(3), plans(3)
    assert [(p.lam, p.layer, p.perm.tolist()) for p in a] == [
        (p.lam, p.layer, p.perm.tolist()) for p in b
    ]


def test_losses():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    soft = 0.6 * F.one_hot(y, 4).float() + 0.4 * F.one_hot(y.flip(0), 4).float()
    p = torch.softmax(logits, 1)
    bce = -(soft * p.log() + (1 - soft) * (1 - p).log()).mean()
    torch.testing.assert_close(mixup.loss_fn(logits, soft, "bce"), bce)
    ce = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(mixup.loss_fn(logits, soft, "ce"), ce)
    # With one-hot targets, ce is the usual cross-entropy.
    torch.testing.assert_close(
        mixup.loss_fn(logits, F.one_hot(y, 4).float(), "ce"), F.cross_entropy(logits, y)
    )
    with pytest.raises(ValueError, match="loss must be one of"):
        mixup.loss_fn(logits, soft, "mse")


def test_bce_works_under_bf16_autocast():
    # BCE refuses to run under autocast; loss_fn computes it in float32 outside it.
    model = create_model("simple_cnn", 10)
    y = torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, soft = mixup.mixed_forward(model, torch.rand(2, 1, 28, 28), y, 10, None)
        loss = mixup.loss_fn(logits, soft, "bce")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
