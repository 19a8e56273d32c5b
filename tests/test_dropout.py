"""The simple CNN's CPU fast path: dropout masks drawn as random bytes (models/dropout.py) keep
nn.Dropout's distribution, scale, layout and gradients; the pooling before the ReLU computes
the same outputs and gradients as the Keras order; and the channels_last policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kmnist_torch.models.dropout import ByteDropout, byte_cut, random_bytes_like
from kmnist_torch.models.registry import create_model
from kmnist_torch.training import cpu

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_byte_cut_is_256p_only_where_that_is_exact():
    assert byte_cut(0.25) == 64 and byte_cut(0.5) == 128 and byte_cut(1 / 256) == 1
    assert byte_cut(255 / 256) == 255
    for p in (0.0, 1.0, 0.3, 0.1, 1 / 512):
        assert byte_cut(p) is None


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_the_mask_drops_with_probability_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    layer = ByteDropout(p).train()
    x = torch.rand(1 << 20) + 1.0  # no zeros: a zero in the output is a dropped element
    out = layer(x)
    kept = out != 0
    # 2^20 Bernoulli draws: the kept fraction's standard deviation is below 0.0005.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003
    assert torch.equal(out[kept], x[kept] * torch.tensor(1 / (1 - p)))
    # Where nn.Dropout keeps an element too, both give the same value.
    ref = F.dropout(x, p)
    both = kept & (ref != 0)
    assert torch.equal(out[both], ref[both])


@pytest.mark.parametrize("last", [False, True])
def test_the_cpu_mask_is_the_random_bytes_not_bernoulli(last, monkeypatch):
    """The fast path is the one taken (bernoulli_ is never called), its mask is exactly the
    bytes below 256 p, and a channels_last map gets the bytes in its memory order."""

    def no_bernoulli(*args, **kwargs):
        raise AssertionError("nn.Dropout's bernoulli_ draw was used")

    monkeypatch.setattr(torch.Tensor, "bernoulli_", no_bernoulli)
    x = torch.rand(4, 8, 6, 6) + 1.0
    if last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(9)
    drawn = random_bytes_like(x)
    torch.manual_seed(9)
    flat = random_bytes_like(torch.empty(x.numel()))
    order = drawn.permute(0, 2, 3, 1) if last else drawn
    assert torch.equal(order.reshape(-1), flat)  # memory order: the draw's own order
    torch.manual_seed(9)
    out = ByteDropout(0.25).train()(x)
    expected = torch.where(drawn >= 64, x * torch.tensor(4 / 3), torch.zeros(()))
    assert torch.equal(out, expected)


def test_eval_mode_is_the_identity_and_the_state_dict_is_nn_dropouts():
    layer = ByteDropout(0.25).eval()
    x = torch.rand(4, 8)
    assert torch.equal(layer(x), x)
    assert layer.state_dict() == {} and isinstance(layer, nn.Dropout)
    keys = list(create_model("simple_cnn", 10).state_dict())
    names = ("conv1", "conv2", "fc1", "fc2")
    assert keys == [f"{n}.{k}" for n in names for k in ("weight", "bias")]


def test_a_seed_gives_the_same_mask_and_the_gradient_is_the_mask():
    layer = ByteDropout(0.5).train()
    x = torch.rand(64, 32, requires_grad=True)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() * 2.0)


def test_a_channels_last_map_gets_its_bytes_in_memory_order():
    x = torch.rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    b = random_bytes_like(x)
    assert b.shape == x.shape and b.stride() == x.stride() and b.dtype == torch.uint8
    plain = torch.rand(2, 3, 4, 5)
    assert random_bytes_like(plain).is_contiguous()
    torch.manual_seed(0)
    out = ByteDropout(0.25).train()(x)
    assert out.shape == x.shape
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * torch.tensor(4 / 3))


@pytest.mark.parametrize("p,inplace", [(0.3, False), (0.0, False), (1.0, False), (0.5, True)])
def test_elsewhere_it_is_nn_dropouts_own_forward(p, inplace):
    x = torch.rand(32, 16) + 1.0
    torch.manual_seed(5)
    ours = ByteDropout(p, inplace=inplace).train()(x.clone())
    torch.manual_seed(5)
    ref = nn.Dropout(p, inplace=inplace).train()(x.clone())
    assert torch.equal(ours, ref)


@settings(max_examples=60, deadline=None)
@given(
    cut=st.integers(1, 255),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_output_is_zero_or_the_scaled_input(cut, shape, last, seed):
    p = cut / 256
    x = torch.rand(shape) + 0.5
    if last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    out = ByteDropout(p).train()(x)
    scaled = x * torch.tensor(1.0 / (1.0 - p))
    assert out.shape == x.shape
    assert bool(((out == 0) | (out == scaled)).all())


def _keras_order(model, x):
    """The simple CNN's forward as the Keras example orders it: ReLU, then max pooling."""
    out = F.relu(model.conv1(x))
    out = F.max_pool2d(F.relu(model.conv2(out)), 2).flatten(1)
    return model.fc2(F.relu(model.fc1(out)))


def test_a_model_converted_under_inference_mode_can_still_train():
    """predict and evaluate convert the caller's model; under the caller's own
    torch.inference_mode its parameters must stay ordinary, trainable tensors."""
    dev = torch.device("cpu")
    model = create_model("simple_cnn", 10)
    with torch.inference_mode():
        cpu.prepare_model(model, dev)
        assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.is_inference() for p in model.parameters())
    loss = model(cpu.prepare_batch(torch.rand(2, 1, 28, 28), dev)).sum()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    before = model.conv2.weight
    assert cpu.prepare_model(model, dev).conv2.weight is before  # already converted


def test_pooling_before_the_relu_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = create_model("simple_cnn", 10, dropout=False)
    x = torch.randn(6, 1, 28, 28)  # negative pixels: whole pooling windows below zero
    ours = model(x)
    ref = _keras_order(model, x)
    assert torch.equal(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(_keras_order(model, x).square().sum(), list(model.parameters()))
    for a, b in zip(g_ours, g_ref):
        assert torch.equal(a, b)


def test_channels_last_on_the_cpu_unless_forced(monkeypatch):
    dev = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        for bf16 in ("auto", "on", "off"):
            cpu.configure(bf16, threads)
            assert cpu.channels_last_enabled(dev, recipe_flag=False)
        assert cpu.channels_last_enabled(torch.device("cuda"), True)
        assert not cpu.channels_last_enabled(torch.device("cuda"), False)
        assert not cpu.channels_last_enabled(torch.device("meta"), True)
        model = cpu.prepare_model(create_model("simple_cnn", 10), dev)
        assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
        x = cpu.prepare_batch(torch.rand(2, 1, 28, 28), dev)
        assert x.is_contiguous(memory_format=torch.channels_last)
        flat = torch.rand(2, 5)
        assert cpu.prepare_batch(flat, dev) is flat
        cpu.configure("auto", threads, channels_last="off")
        assert not cpu.channels_last_enabled(dev, True)
        assert cpu.prepare_batch(x.contiguous(), dev).is_contiguous()
        cpu.configure("auto", threads, channels_last="on")
        assert cpu.channels_last_enabled(dev, False)
        # On CUDA the recipe decides, whatever the CPU policy says.
        assert not cpu.channels_last_enabled(torch.device("cuda"), False)
        with pytest.raises(ValueError, match="channels_last must be one of"):
            cpu.configure("auto", threads, channels_last="sometimes")
    finally:
        cpu.configure("auto", None, keep_threads=True)
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu.compile_available(), reason="torch.compile needs a C++ compiler")
def test_under_torch_compile_the_mask_keeps_its_distribution():
    """Inductor draws the bytes with its own generator (no fallback to eager's): the kept
    fraction and the scale hold there too."""
    layer = ByteDropout(0.25).train()
    compiled = torch.compile(lambda t: layer(t), fullgraph=True)
    x = torch.rand(1 << 18) + 1.0
    torch.manual_seed(0)
    out = compiled(x)
    kept = out != 0
    # 2^18 draws: the kept fraction's standard deviation is under 0.001.
    assert abs(kept.float().mean().item() - 0.75) < 0.006
    assert torch.allclose(out[kept], x[kept] * (4 / 3), rtol=1e-6, atol=0)
