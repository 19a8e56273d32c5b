"""Convolution weight gradients as matrix products, for training on a CPU whose oneDNN
convolutions have only AVX2 kernels.

A convolution's weight gradient is one matrix product: dW (O x kh*kw*C) sums, over every output
position r of every image, the outer product of the gradient there (g[r], O values) and the
input patch it saw (kh*kw*C values). :func:`weight_grad` forms the patches of
:data:`IMAGES_PER_CHUNK` images at a time (an im2col of a few hundred kilobytes to a few
megabytes, which stays in the cache) and adds patches^T @ g into dW with one BLAS call per
chunk. oneDNN computes the same sums in its own loop order; on the 2-core AMD EPYC development
machine (AVX2, no AVX-512) its weight gradients ran at 42-105 GFLOP/s, against 100-141 GFLOP/s
for the chunked products (2 threads, channels_last, float32, one layer at a time, the median of
9): the simple CNN's second convolution at batch 128 took 47.3 ms against 26.1 ms, and
PreActResNet-18's last 512-channel convolution at batch 32 56.9 ms against 22.0 ms. Four
images a chunk was fastest on every 3x3 layer of both models, against 1, 2, 8, 32 and the whole
batch; a layer whose patches are narrower than :data:`NARROW_PATCH` values (a first convolution
on one channel) takes the whole batch in one product. 1x1 convolutions stay with oneDNN, which
was faster there (1.47 ms against 1.68 ms for the chunked products, PreActResNet-18's first
projection shortcut). In whole training steps, where the layers' inputs are no longer in the
cache, the gain was smaller: 3-10% for the simple CNN at batch 128 and 6-8% for
PreActResNet-18 at batch 32 (alternating steps, the median of 30 to 40 and 10 to 12).

The forward pass and the input gradient stay oneDNN's (:class:`GemmWgradConv2d` calls
``F.conv2d`` and ``convolution_backward`` for them), so a model gives the same outputs and
input gradients bit for bit; the weight and bias gradients (the bias's is ``g.sum``) agree with
oneDNN's to float32 rounding (a relative 1e-5 for the simple CNN's 73,728-term sums), and are
deterministic for a given number of threads. The path was timed only in float32 and
channels_last; it also computes float64 and torch's default layout (a strided gather then)
correctly. :func:`install` swaps a model's plain ``nn.Conv2d`` layers for
:class:`GemmWgradConv2d`: the same parameters and state dict, and a model that scripts,
traces, exports and compiles as before, because the matrix-product path runs only in eager
autograd on the CPU: a batch of 4-D float32 or float64 tensors, autograd on, no autocast,
not under ``torch.compile``, scripting, tracing, FX or ONNX export, and not with forward-mode
dual tensors (it has no ``jvp``). A backward pass that builds a graph (``create_graph``, for
double backward) takes oneDNN's weight gradient, whose derivative torch knows.
:mod:`kmnist_torch.training.cpu` decides where models get it: the trainer's own models, never
a model handed to ``predict`` or ``evaluate``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

IMAGES_PER_CHUNK = 4
# Patches narrower than this (C * kh * kw values) take the whole batch in one product: a
# first convolution on one channel (9 values) has too little work per chunk.
NARROW_PATCH = 32
DTYPES = (torch.float32, torch.float64)


def weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    images: int = IMAGES_PER_CHUNK,
) -> torch.Tensor:
    """The weight gradient (O x C x kh x kw, channels_last) of a convolution (groups 1,
    dilation 1, zero padding) of ``x`` (N x C x H x W) whose output gradient is ``g``
    (N x O x Ho x Wo), summed over ``images`` images at a time (module docstring)."""
    n, c, h, w = x.shape
    o, ho, wo = g.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if g.shape[0] != n or ho != (h + 2 * ph - kh) // sh + 1 or wo != (w + 2 * pw - kw) // sw + 1:
        raise ValueError(f"output gradient {tuple(g.shape)} does not fit input {tuple(x.shape)}")
    per, cols = ho * wo, kh * kw * c
    chunk = max(1, n if cols < NARROW_PATCH else min(n, images))
    xn = x.permute(0, 2, 3, 1)  # N H W C: a view, contiguous when x is channels_last
    gn = g.permute(0, 2, 3, 1).reshape(n * per, o)
    staged = x.new_zeros(chunk, h + 2 * ph, w + 2 * pw, c) if ph or pw else None
    patches = x.new_empty(chunk * per, cols)
    out_t = x.new_zeros(cols, o)
    for lo in range(0, n, chunk):
        m = min(n, lo + chunk) - lo
        src = xn[lo : lo + m]
        if staged is not None:  # the border stays zero: only the inside is written
            staged[:m, ph : ph + h, pw : pw + w].copy_(src)
            src = staged[:m]
        b, y, x_, ch = src.stride()
        windows = src.as_strided(
            (m, ho, wo, kh, kw, c), (b, y * sh, x_ * sw, y, x_, ch), src.storage_offset()
        )
        rows = patches[: m * per]
        rows.view(m, ho, wo, kh, kw, c).copy_(windows)
        out_t.addmm_(rows.t(), gn[lo * per : (lo + m) * per])
    # (kh kw C) x O -> O x (kh kw C): the strides of a channels_last O x C x kh x kw weight.
    return out_t.t().contiguous().view(o, kh, kw, c).permute(0, 3, 1, 2)


class _GemmWgrad(torch.autograd.Function):
    """``F.conv2d`` whose weight gradient is :func:`weight_grad`'s."""

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = (tuple(stride), tuple(padding), bias is not None)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1] and torch.is_grad_enabled():
            # create_graph: oneDNN's, whose derivative torch knows (weight_grad reuses its
            # buffers in place, which a graph through it could not).
            gw = torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                [False, True, False],
            )[1]  # fmt: skip
        elif ctx.needs_input_grad[1]:
            gw = weight_grad(x, g, tuple(weight.shape[2:]), stride, padding)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # torch 2.3 on
    if check is None:
        from torch import _dynamo

        check = _dynamo.is_compiling
    return bool(check())


# torch 2.4 on asks for the device type; before, a function of its own (decided once here, not
# by catching errors at every call).
try:
    torch.is_autocast_enabled("cpu")
    _autocast_on = functools.partial(torch.is_autocast_enabled, "cpu")
except TypeError:
    _autocast_on = torch.is_autocast_cpu_enabled


def _wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call takes the matrix-product weight gradient (module docstring)."""
    if _compiling() or isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return False
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] > 0
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and not _autocast_on()
        and not torch.onnx.is_in_onnx_export()
        and forward_ad.unpack_dual(x).tangent is None
        and forward_ad.unpack_dual(weight).tangent is None
    )


class GemmWgradConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient is a chunked matrix product where
    :func:`_wanted`; everything else, forward pass included, is ``nn.Conv2d``'s."""

    def _conv_forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        # TorchScript compiles this method: no super() and no Python-only checks there
        # (eligible() guarantees zero padding given as numbers, so F.conv2d is exact).
        if not torch.jit.is_scripting():
            if _wanted(input, weight):
                return _GemmWgrad.apply(input, weight, bias, self.stride, self.padding)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def eligible(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass) that :func:`weight_grad` computes: groups 1,
    dilation 1, zero padding given as numbers, a kernel larger than 1x1."""
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.kernel_size != (1, 1)
    )


def install(model: nn.Module) -> int:
    """Swap ``model``'s eligible convolutions for :class:`GemmWgradConv2d` in place (the same
    parameters and state dict); how many were swapped."""
    swapped = 0
    for module in model.modules():
        if eligible(module):
            module.__class__ = GemmWgradConv2d
            swapped += 1
    return swapped


def uninstall(model: nn.Module) -> int:
    """Undo :func:`install`: every :class:`GemmWgradConv2d` back to ``nn.Conv2d``."""
    swapped = 0
    for module in model.modules():
        if type(module) is GemmWgradConv2d:
            module.__class__ = nn.Conv2d
            swapped += 1
    return swapped
