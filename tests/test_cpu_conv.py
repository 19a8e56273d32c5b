"""Matrix-product weight gradients (kmnist_torch.training.cpu_conv): the same gradients as
oneDNN's, on the convolutions the models have and on any shape Hypothesis draws, and only where
the policy puts them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kmnist_torch.models.registry import create_model
from kmnist_torch.training import cpu, cpu_conv

AVX2 = frozenset({"avx2", "fma"})


def _reference(x, g, weight, stride, padding):
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip


@pytest.fixture(autouse=True)
def _policy():
    saved = cpu.POLICY.gemm_wgrad
    yield
    cpu.POLICY.gemm_wgrad = saved


@pytest.mark.parametrize(
    "shape",
    [
        # N, C, O, H, W, kernel, stride, padding: the simple CNN's two convolutions, then
        # PreActResNet-18's stem, a 3x3 of each stage and a strided one.
        (6, 1, 32, 28, 28, 3, 1, 0),
        (6, 32, 64, 26, 26, 3, 1, 0),
        (5, 1, 64, 28, 28, 3, 1, 1),
        (5, 64, 64, 28, 28, 3, 1, 1),
        (5, 128, 256, 14, 14, 3, 2, 1),
        (9, 512, 512, 4, 4, 3, 1, 1),
    ],
)
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_weight_grad_is_onednns_on_the_models_layers(shape, layout):
    n, c, o, h, w, k, s, p = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(o, c, k, k, generator=gen).contiguous(memory_format=layout)
    g = torch.randn_like(F.conv2d(x, weight, None, s, p)).contiguous(memory_format=layout)
    ours = cpu_conv.weight_grad(x, g, (k, k), (s, s), (p, p))
    ref = _reference(x, g, weight, (s, s), (p, p))
    assert ours.shape == ref.shape
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    c=st.integers(1, 9),
    o=st.integers(1, 9),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    images=st.integers(1, 8),
    channels_last=st.booleans(),
)
def test_weight_grad_matches_any_convolution(
    n, c, o, h, w, kh, kw, sh, sw, ph, pw, images, channels_last
):
    """Every shape, stride, padding and chunk size, in float64: equal to oneDNN's to
    rounding (padding wider than the kernel reach included)."""
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return  # no output position: not a convolution torch accepts either
    layout = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(n * 1000 + c)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    weight = torch.randn(o, c, kh, kw, generator=gen, dtype=torch.float64)
    out = F.conv2d(x, weight, None, (sh, sw), (ph, pw))
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = cpu_conv.weight_grad(x, g, (kh, kw), (sh, sw), (ph, pw), images=images)
    ref = _reference(x, g, weight, (sh, sw), (ph, pw))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_a_gradient_that_does_not_fit_the_input_is_refused():
    x, g = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"does not fit input \(2, 3, 8, 8\)"):
        cpu_conv.weight_grad(x, g, (3, 3))


def test_the_function_passes_gradcheck_for_input_weight_and_bias():
    """gradcheck of all three gradients (the weight's is weight_grad's), stride 2, padding."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = (
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
        for shape in ((2, 3, 7, 6), (4, 3, 3, 3), (4,))
    )

    def conv(x, w, b):
        return cpu_conv._GemmWgrad.apply(x, w, b, (2, 2), (1, 1))

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))  # create_graph: oneDNN's, differentiable


def test_the_layer_takes_the_product_path_in_training():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    assert cpu_conv.install(conv) == 1
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    assert "_GemmWgrad" in type(conv(x).grad_fn).__name__


def _step_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["simple_cnn", "preact18"])
def test_a_model_step_gives_the_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, 10, in_chans=1, dropout=False) if name == "simple_cnn" else (
        create_model(name, 10, in_chans=1)
    )  # fmt: skip
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    out_ref, grads_ref = _step_grads(model, x, y)
    keys = set(model.state_dict())
    swapped = cpu_conv.install(model)
    assert swapped == (2 if name == "simple_cnn" else 17)  # preact18's 1x1 shortcuts stay
    assert set(model.state_dict()) == keys
    out, grads = _step_grads(model, x, y)
    assert torch.equal(out, out_ref)  # the forward pass is oneDNN's, bit for bit
    for k, g in grads.items():
        torch.testing.assert_close(g, grads_ref[k], rtol=1e-4, atol=1e-5, msg=k)
    assert cpu_conv.uninstall(model) == swapped
    assert all(type(m) is not cpu_conv.GemmWgradConv2d for m in model.modules())


def test_the_product_path_runs_only_where_it_was_measured():
    conv = nn.Conv2d(2, 3, 3)
    cpu_conv.install(conv)
    x = torch.randn(1, 2, 5, 5)

    def fn(*args):
        return type(conv(*args).grad_fn).__name__

    assert "_GemmWgrad" in fn(x)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", torch.bfloat16):
        assert "_GemmWgrad" not in fn(x)  # bf16: oneDNN's own path
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    assert "_GemmWgrad" not in fn(x.requires_grad_())  # only the input's gradient wanted


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_what_a_plain_convolution_accepts_still_works():
    """Unbatched and empty batches, scripting, FX, tracing, torch.compile, forward-mode AD and
    torch.func: as nn.Conv2d does (the product path stays out of all but eager autograd)."""
    torch.manual_seed(0)
    conv, plain = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    cpu_conv.install(conv)
    for x in (torch.randn(3, 8, 8), torch.randn(0, 3, 8, 8)):
        conv(x).sum().backward()  # what nn.Conv2d accepts
    x = torch.randn(2, 3, 8, 8)
    for other in (torch.jit.script(conv), torch.fx.symbolic_trace(conv)):
        torch.testing.assert_close(other(x), plain(x), rtol=0, atol=0)
    traced = torch.jit.trace(conv, (x,))
    assert "_GemmWgrad" not in str(traced.graph)
    compiled = torch.compile(conv, backend="eager")
    assert "_GemmWgrad" not in type(compiled(x).grad_fn).__name__
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.ones_like(x))
        tangent = fwad.unpack_dual(conv(dual)).tangent
    assert tangent is not None
    grads = torch.func.grad(lambda p, x: torch.func.functional_call(conv, p, (x,)).sum())(
        dict(conv.named_parameters()), x
    )
    ref = torch.func.grad(lambda p, x: torch.func.functional_call(plain, p, (x,)).sum())(
        dict(plain.named_parameters()), x
    )
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], msg=k)


def test_only_plain_convolutions_with_a_kernel_are_swapped():
    layers = nn.Sequential(
        nn.Conv2d(2, 2, 1),  # 1x1: oneDNN was as fast
        nn.Conv2d(2, 2, 3, groups=2),
        nn.Conv2d(2, 2, 3, dilation=2),
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        type("MyConv", (nn.Conv2d,), {})(2, 2, 3),  # a user's subclass keeps its forward
        nn.Conv2d(2, 2, 3, padding=1),
    )
    assert cpu_conv.install(layers) == 1
    assert type(layers[-1]) is cpu_conv.GemmWgradConv2d


@pytest.mark.parametrize(
    "flags, mode, env, expected",
    [
        (AVX2, "auto", None, True),
        (AVX2 | {"avx512f"}, "auto", None, False),
        (frozenset(), "auto", None, False),  # no cpuinfo (macOS, Windows) or not x86
        (AVX2, "auto", "0", False),
        (frozenset(), "auto", "1", True),
        (frozenset(), "on", None, True),
        (AVX2, "off", "1", False),
    ],
)
def test_the_policy_decides_where_models_get_it(monkeypatch, flags, mode, env, expected):
    if env is None:
        monkeypatch.delenv("KMNIST_TORCH_GEMM_WGRAD", raising=False)
    else:
        monkeypatch.setenv("KMNIST_TORCH_GEMM_WGRAD", env)
    cpu.POLICY.gemm_wgrad = mode
    assert cpu.gemm_wgrad_enabled(torch.device("cpu"), flags) is expected
    assert not cpu.gemm_wgrad_enabled(torch.device("meta"), flags)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    for training in (True, False):  # never on a model handed to predict or evaluate
        model = create_model("simple_cnn", 10, in_chans=1)
        model = cpu.prepare_model(model, torch.device("cpu"), training=training)
        assert (type(model.conv2) is cpu_conv.GemmWgradConv2d) is (expected and training)


def test_configure_checks_the_mode():
    with pytest.raises(ValueError, match="gemm_wgrad must be one of"):
        cpu.configure(gemm_wgrad="yes", device="meta")
