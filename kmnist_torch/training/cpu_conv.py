"""Convolution weight gradients as matrix products, for training on a CPU whose oneDNN
convolutions have only AVX2 kernels.

A convolution's weight gradient is one matrix product: dW (O x kh*kw*C) sums, over every output
position r of every image, the outer product of the gradient there (g[r], O values) and the
input patch it saw (kh*kw*C values). :func:`weight_grad` forms the patches of
:data:`IMAGES_PER_CHUNK` images at a time (an im2col of a few hundred kilobytes to a few
megabytes, which stays in the cache) and adds patches^T @ g into dW with one BLAS call per
chunk. oneDNN computes the same sums in its own loop order; on the 2-core AMD EPYC development
machine (AVX2, no AVX-512) its weight gradients ran at 42-105 GFLOP/s, against 100-141 GFLOP/s
for the chunked products (2 threads, channels_last, one layer at a time, the median of 9): the
simple CNN's second convolution at batch 128 took 47.3 ms against 26.1 ms, and
PreActResNet-18's last 512-channel convolution at batch 32 56.9 ms against 22.0 ms. Four
images a chunk was fastest on every 3x3 layer of both models, against 1, 2, 8, 32 and the whole
batch; a layer whose patches are narrower than :data:`NARROW_PATCH` values (a first convolution
on one channel) takes the whole batch in one product. 1x1 convolutions stay with oneDNN, which
was as fast there (1.47 against 1.68 ms). In whole training steps, where the layers' inputs are
no longer in the cache, the gain was smaller: 3-10% for the simple CNN at batch 128 and 8% for
PreActResNet-18 at batch 32 (alternating steps, the median of 30 and 10).

The forward pass and the input gradient stay oneDNN's (:class:`GemmWgradConv2d` calls
``F.conv2d`` and ``convolution_backward`` for them), so a model gives the same outputs bit for
bit; the weight gradients agree with oneDNN's to float32 rounding (a relative 1e-5 for the
simple CNN's 73,728-term sums), and are deterministic for a given number of threads.
:func:`install` swaps a model's plain ``nn.Conv2d`` layers for :class:`GemmWgradConv2d` (its
state dict, model files and every other behaviour unchanged); the matrix-product path runs only
where it was measured: a CPU tensor in float32 or float64, autograd on, no autocast, not under
``torch.compile``, tracing or ONNX export. :mod:`kmnist_torch.training.cpu` decides where
models get it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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
    chunk = n if cols < NARROW_PATCH else max(1, min(n, images))
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
    def forward(ctx: Any, x, weight, bias, stride, padding):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.conv = (tuple(stride), tuple(padding), bias is not None)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor):  # noqa: ANN205
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
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


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def _wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call takes the matrix-product weight gradient (module docstring)."""
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and x.device.type == "cpu"
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and not _autocast_on()
        and not _compiling()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
    )


class GemmWgradConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient is a chunked matrix product where
    :func:`_wanted`; everything else, forward pass included, is ``nn.Conv2d``'s."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if _wanted(input, weight):
            return _GemmWgrad.apply(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)


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
