"""Batch-invariant CPU kernels: an image's pixels must not depend on what it was batched with.

CPU libraries pick code paths by problem size. MKL's GEMM with few rows (a time embedding,
one row per image), oneDNN's convolutions (a lone image vs. several; 1x1 convolutions, which
become one GEMM over every pixel of the batch), kernels chosen by memory format (which is
ambiguous for a batch of one) and the scalar remainder of SIMD loops (whose position depends
on the total size) all round differently at different batch sizes, so the same image made
alone and in a batch differs by ~1e-6, which flips an 8-bit pixel value by one level about
once in 10^4. `batch_invariant()` routes exactly those ops through computations whose result
for one sample depends only on that sample:

- `linear`: one GEMM per sample (`bmm`/`baddbmm` against the shared weight), so a sample's
  GEMM has the same shape in any batch.
- 1x1 convolutions (stride 1, no padding, one group): the same per-sample GEMM.
- other convolutions: oneDNN computes every image of a batch of two or more identically,
  wherever it sits in the batch; only a batch of one takes another path, so a lone image is
  run as a batch of two (itself twice) and the copy dropped.
- group norm, interpolation and convolutions get contiguous (NCHW) inputs, so the kernel never
  depends on how a batch of one happens to be laid out.
- transcendental element-wise ops (silu, gelu, sigmoid, exp, sin, ...) run on inputs padded
  to whole SIMD steps, so no element falls in the scalar remainder.

Every other op the model families use (add/mul, layer norm, softmax, attention, einsum/bmm)
already computes each sample on its own. The unit tests check the whole claim on the real
model classes of every family at several batch sizes, positions and thread counts.

What it costs: time (a Python dispatch per torch call, smaller per-sample GEMMs, a lone
image's convolutions run twice; measured by bench/batch_invariance.py) and exact equality
with the default kernels: an image made under it can differ from diffusers' by ~1e-6. Only
CPU tensors are rerouted; CUDA kernels (cuBLAS, cuDNN) have their own size-dependent choices
that this does not address.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["batch_invariant"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            ) -> torch.Tensor:
    if x.dim() < 2:
        return F.linear(x, weight, bias)
    per_sample = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, K); 2-D input: T = 1
    weights = weight.t().expand(x.shape[0], -1, -1)  # (N, K, O), no copy
    out = (torch.bmm(per_sample, weights) if bias is None
           else torch.baddbmm(bias, per_sample, weights))  # (N, T, O)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _is_pointwise(weight: torch.Tensor, stride: Any, padding: Any, dilation: Any,
                  groups: int) -> bool:
    def ones(value: Any) -> bool:
        return all(v == 1 for v in value) if isinstance(value, (tuple, list)) else value == 1

    def zeros(value: Any) -> bool:
        if isinstance(value, str):
            return value == "valid" or value == "same"  # a 1x1 kernel pads nothing either way
        return all(v == 0 for v in value) if isinstance(value, (tuple, list)) else value == 0

    return (weight.shape[-2:] == (1, 1) and groups == 1 and ones(stride) and ones(dilation)
            and zeros(padding))


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
            ) -> torch.Tensor:
    if x.dim() != 4:  # unbatched (C, H, W): one sample, nothing to vary with
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    x = x.contiguous()
    n, c, h, w = x.shape
    if _is_pointwise(weight, stride, padding, dilation, groups):
        pixels = x.reshape(n, c, h * w)  # (N, C, HW)
        kernel = weight.reshape(1, weight.shape[0], c).expand(n, -1, -1)  # (N, O, C)
        out = (torch.bmm(kernel, pixels) if bias is None
               else torch.baddbmm(bias.reshape(-1, 1), kernel, pixels))  # (N, O, HW)
        return out.reshape(n, -1, h, w)
    if n == 1:
        # Two real rows, not a stride-0 view: an ordinary batch of two, as the tests check.
        return F.conv2d(torch.cat([x, x]), weight, bias, stride, padding, dilation, groups)[:1]
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    return F.group_norm(x.contiguous(), num_groups, weight, bias, eps)


def _interpolate(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return F.interpolate(x.contiguous(), *args, **kwargs)


# Element-wise ops whose vectorised (SIMD) code and scalar remainder code round differently.
_TRANSCENDENTAL: tuple[Callable[..., Any], ...] = (
    F.silu, F.gelu, F.mish, F.softplus, F.elu,
    torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.erf, torch.sin, torch.cos,
    torch.rsqrt,
)
_METHODS = ("sigmoid", "tanh", "exp", "log", "erf", "sin", "cos", "rsqrt")
_INPLACE_POSITION = {F.silu: 0, F.mish: 0, F.elu: 1}  # of `inplace` among the args after x
# Floats per step of ATen's vectorised loop: 2 vectors of 16 with AVX-512 (of 8 with AVX2).
_SIMD_STEP = 32


def _whole_steps(numel: int) -> int:
    """`numel` rounded up so that every chunk the intra-op threads split it into is whole
    SIMD steps: chunks are ceil(total / threads) elements, threads being 1..num_threads."""
    threads = torch.get_num_threads() if numel > 32768 else 1  # ATen's GRAIN_SIZE
    multiple = _SIMD_STEP * math.lcm(*range(1, threads + 1))
    return -(-numel // multiple) * multiple


def _elementwise(func: Callable[..., Any], always_inplace: bool = False,
                 ) -> Callable[..., torch.Tensor]:
    """`func` (out of place) on every element through the SIMD path; written into the input
    when the call asked for that (`inplace=True`, or `always_inplace` for `Tensor.exp_`...)."""
    position = _INPLACE_POSITION.get(func)

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        inplace = always_inplace or bool(kwargs.pop("inplace", False))
        if position is not None and len(args) > position:
            inplace = inplace or bool(args[position])
            args = (*args[:position], False, *args[position + 1:])
        if not x.is_floating_point() or x.numel() < 2 or kwargs.get("out") is not None:
            out = func(x, *args, **kwargs)
            return x.copy_(out) if inplace else out
        # Where an element falls (a SIMD step or the scalar remainder) depends on the total
        # size; padded to whole steps, every element takes the SIMD path, wherever it sits.
        missing = _whole_steps(x.numel()) - x.numel()
        if not missing and x.is_contiguous():
            out = func(x, *args, **kwargs)
        else:
            flat = x.reshape(-1)
            if missing:
                flat = torch.cat([flat, flat.new_zeros(missing)])
            out = func(flat, *args, **kwargs)[: x.numel()].view(x.shape)
        return x.copy_(out) if inplace else out

    return run


_REROUTED: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    F.conv2d: _conv2d,
    F.group_norm: _group_norm,
    F.interpolate: _interpolate,
    **{func: _elementwise(func) for func in _TRANSCENDENTAL},
    **{getattr(torch.Tensor, name): _elementwise(getattr(torch.Tensor, name))
       for name in _METHODS},
    **{getattr(torch.Tensor, name + "_"): _elementwise(getattr(torch.Tensor, name),
                                                       always_inplace=True)
       for name in _METHODS},
}


def _on_cpu(args: tuple[Any, ...]) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"


class _BatchInvariantMode(TorchFunctionMode):
    # Every torch call in the block passes through here: keep the common path short.
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        replacement = _REROUTED.get(func)
        if replacement is None:
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if not args and "input" in kwargs:  # F.silu(input=x): the replacements take x first
            args = (kwargs.pop("input"),)
        # Inside this method the mode is off, so the replacements call the real ops.
        if _on_cpu(args):
            return replacement(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def batch_invariant(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within this block, in this thread, a model on `device` computes each sample
    independently of its batch-mates, so an image is bit-identical alone or in any batch.

    Does nothing for a device other than the CPU: only CPU kernels are covered, and the
    per-op dispatch would cost time for nothing."""
    if torch.device(device).type != "cpu":
        yield
        return
    with _BatchInvariantMode():
        yield
