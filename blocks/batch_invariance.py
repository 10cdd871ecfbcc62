"""Batch-invariant CPU kernels: an image's pixels must not depend on what it was batched with.

CPU libraries pick code paths by problem size. MKL's GEMM with few rows (a time embedding,
one row per image), convolutions (PyTorch sends a lone small image to im2col + GEMM and a batch
to oneDNN; 1x1 convolutions become one GEMM over every pixel of the batch), kernels chosen by
memory format (which is ambiguous for a batch of one) and the scalar remainder of SIMD loops
(whose position depends on the total size) all round differently at different batch sizes, so
the same image made alone and in a batch differs by ~1e-6, which flips an 8-bit pixel value by
one level about once in 10^4. Within `batch_invariant()`, exactly those ops go through
computations whose result for one sample depends only on that sample:

- `linear`: one GEMM per sample (`bmm`/`baddbmm` against the shared weight), so a sample's
  GEMM has the same shape in any batch.
- 1x1 convolutions (stride 1, no padding, one group): the same per-sample GEMM.
- other convolutions: oneDNN, which computes every image of a batch identically wherever it
  sits in the batch, for a lone image too (called directly: `F.conv2d` would take im2col).
- group norm, interpolation and convolutions get contiguous (NCHW) inputs, so the kernel never
  depends on how a batch of one happens to be laid out.
- transcendental element-wise ops (silu, gelu, sigmoid, exp, sin, ...) see only inputs that
  are whole SIMD steps (padded when they are not), so no element falls in a scalar remainder.

Every other op the model families use (add/mul, layer norm, softmax, attention, einsum/bmm)
already computes each sample on its own. The unit tests check the whole claim on the real
model classes of every family at several batch sizes, positions and thread counts.

How: when this module is imported, the public names of those ops (`torch.nn.functional.linear`,
`torch.sigmoid`, `torch.Tensor.exp`, ... listed in `_REROUTED_NAMES`) are replaced by
wrappers that call the invariant version when the calling thread is inside
`batch_invariant()` and the input is on the CPU, and the original op otherwise. Every other
torch call runs as if this module did not exist. (A `TorchFunctionMode` would catch every
call instead, but it routes each one through Python, `.shape` included: on the small models
served here that dispatch alone made a lone image 20-45% slower.) The price of rerouting by
name: a reference to one of these functions taken before this module was imported (an
`act = F.gelu` stored by a model built earlier, a `from torch import sin` run earlier) still
calls the default kernel. Serving code imports this module before it loads any model, so the
models it builds hold the wrappers; a wrapper pickles by its name here.

What it costs: a little time (per-sample GEMMs, a Python call per rerouted op, oneDNN's fixed
cost for a lone small image's convolutions; measured by bench/batch_invariance.py) and exact
equality with the default kernels: an image made under it can differ from diffusers' by ~1e-6.
Not handled here: CUDA tensors (cuBLAS and cuDNN have their own size-dependent choices that
this does not address) and ops reached by other names (`torch.ops.aten.*`, `torch.special`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["batch_invariant", "is_active"]


class _ThreadState(threading.local):
    rerouting = False  # inside batch_invariant() in this thread


_thread = _ThreadState()

# The names rerouted, per namespace. F.conv2d and torch.conv2d are one function.
_REROUTED_NAMES: dict[Any, tuple[str, ...]] = {
    F: ("linear", "conv2d", "group_norm", "interpolate",
        "silu", "gelu", "mish", "softplus", "elu"),
    torch: ("conv2d", "sigmoid", "tanh", "exp", "log", "erf", "sin", "cos", "rsqrt"),
    torch.Tensor: ("sigmoid", "tanh", "exp", "log", "erf", "sin", "cos", "rsqrt",
                   "sigmoid_", "tanh_", "exp_", "log_", "erf_", "sin_", "cos_", "rsqrt_"),
}
_ORIGINAL_ATTRIBUTE = "_batch_invariance_original"


def _original(namespace: Any, name: str) -> Callable[..., Any]:
    """The op itself, also when this module was imported (and its wrappers installed) before."""
    function = getattr(namespace, name)
    return getattr(function, _ORIGINAL_ATTRIBUTE, function)


# The default kernels, which the invariant versions call.
_linear_op = _original(F, "linear")
_conv2d_op = _original(F, "conv2d")
_group_norm_op = _original(F, "group_norm")
_interpolate_op = _original(F, "interpolate")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            ) -> torch.Tensor:
    if x.dim() == 3:  # (N, T, K): already one GEMM per sample
        per_sample = x
    elif x.dim() < 2:
        return _linear_op(x, weight, bias)
    else:
        per_sample = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, K); 2-D input: T = 1
    weights = weight.t().expand(per_sample.shape[0], -1, -1)  # (N, K, O), no copy
    out = (torch.bmm(per_sample, weights) if bias is None
           else torch.baddbmm(bias, per_sample, weights))  # (N, T, O)
    return out if x.dim() == 3 else out.view(*x.shape[:-1], weight.shape[0])


def _pair(value: Any) -> list[int] | None:
    """A convolution's stride, padding or dilation as [h, w]; None for a padding string."""
    if isinstance(value, str):
        return None
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def _is_pointwise(weight: torch.Tensor, stride: Any, padding: Any, dilation: Any,
                  groups: int) -> bool:
    if weight.shape[-1] != 1 or weight.shape[-2] != 1 or groups != 1:
        return False
    # A 1x1 kernel pads nothing for "valid" or "same".
    unpadded = isinstance(padding, str) or not any(_pair(padding))  # type: ignore[arg-type]
    return unpadded and _pair(stride) == [1, 1] and _pair(dilation) == [1, 1]


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
            ) -> torch.Tensor:
    if x.dim() != 4:  # unbatched (C, H, W): one sample, nothing to vary with
        return _conv2d_op(x, weight, bias, stride, padding, dilation, groups)
    x = x.contiguous()
    n, c, h, w = x.shape
    if _is_pointwise(weight, stride, padding, dilation, groups):
        pixels = x.view(n, c, h * w)  # (N, C, HW)
        kernel = weight.view(1, weight.shape[0], c).expand(n, -1, -1)  # (N, O, C)
        out = (torch.bmm(kernel, pixels) if bias is None
               else torch.baddbmm(bias.view(-1, 1), kernel, pixels))  # (N, O, HW)
        return out.view(n, -1, h, w)
    if n > 1:  # oneDNN (PyTorch's choice for any batch of float32 images)
        return _conv2d_op(x, weight, bias, stride, padding, dilation, groups)
    # A lone image, which PyTorch would send to im2col + GEMM when small: oneDNN directly.
    padding_pair = _pair(padding)
    if (padding_pair is not None and x.dtype == weight.dtype == torch.float32
            and weight.layout == torch.strided and torch._C._get_mkldnn_enabled()):
        return torch.mkldnn_convolution(x, weight, bias, padding_pair, _pair(stride),
                                        _pair(dilation), groups)
    # Otherwise as one of an ordinary batch of two (real rows, not a stride-0 view).
    return _conv2d_op(torch.cat([x, x]), weight, bias, stride, padding, dilation, groups)[:1]


def _group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    return _group_norm_op(x.contiguous(), num_groups, weight, bias, eps)


def _interpolate(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _interpolate_op(x.contiguous(), *args, **kwargs)


_INPLACE_POSITION = {"silu": 0, "mish": 0, "elu": 1}  # of `inplace` among the args after x
# Floats per step of ATen's vectorised loop: 2 vectors of 16 with AVX-512 (of 8 with AVX2).
_SIMD_STEP = 32
# The smallest tensor ATen splits between threads: gelu's (above it, one chunk per thread);
# most element-wise ops only split above 32768.
_GRAIN_SIZE = 16384
_STEP_MULTIPLES: dict[int, int] = {}  # intra-op threads -> the multiple every chunk needs


def _whole_steps(numel: int) -> int:
    """`numel` rounded up so that every chunk the intra-op threads split it into is whole
    SIMD steps: chunks are ceil(total / threads) elements, threads being 1..num_threads."""
    threads = torch.get_num_threads() if numel > _GRAIN_SIZE else 1
    multiple = _STEP_MULTIPLES.get(threads)
    if multiple is None:
        multiple = _STEP_MULTIPLES[threads] = _SIMD_STEP * math.lcm(*range(1, threads + 1))
    return -(-numel // multiple) * multiple


def _rows_of_whole_steps(x: torch.Tensor) -> bool:
    """A strided input whose rows are contiguous and whole SIMD steps (`x.chunk(2, -1)` of a
    GEGLU): the loop runs row by row, so no element of it is in a scalar remainder."""
    return x.stride(-1) == 1 and x.shape[-1] % _SIMD_STEP == 0


def _elementwise(func: Callable[..., Any], inplace_position: int | None = None,
                 always_inplace: bool = False) -> Callable[..., torch.Tensor]:
    """`func` (out of place) on every element through the SIMD path; written into the input
    when the call asked for that (`inplace=True`, or `always_inplace` for `Tensor.exp_`...)."""

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        inplace = always_inplace or bool(kwargs.pop("inplace", False))
        if inplace_position is not None and len(args) > inplace_position:
            inplace = inplace or bool(args[inplace_position])
            args = (*args[:inplace_position], False, *args[inplace_position + 1:])
        numel = x.numel()
        if numel < 2 or not x.is_floating_point() or kwargs.get("out") is not None:
            out = func(x, *args, **kwargs)
            return x.copy_(out) if inplace else out
        # Where an element falls (a SIMD step or the scalar remainder) depends on the total
        # size; in whole steps, every element takes the SIMD path, wherever it sits.
        padded = _whole_steps(numel)
        if padded == numel and (x.is_contiguous() or _rows_of_whole_steps(x)):
            out = func(x, *args, **kwargs)
        else:
            flat = x.new_empty(padded)  # one copy: x, then zeros
            flat[:numel].view(x.shape).copy_(x)
            flat[numel:].zero_()
            out = func(flat, *args, **kwargs)[:numel].view(x.shape)
        return x.copy_(out) if inplace else out

    return run


_STRUCTURAL = {"linear": _linear, "conv2d": _conv2d, "group_norm": _group_norm,
               "interpolate": _interpolate}


def _replacement(namespace: Any, name: str) -> Callable[..., torch.Tensor]:
    if name in _STRUCTURAL:
        return _STRUCTURAL[name]
    if name.endswith("_"):  # x.exp_(): the op, written into x
        return _elementwise(_original(namespace, name[:-1]), always_inplace=True)
    return _elementwise(_original(namespace, name), _INPLACE_POSITION.get(name))


def _rerouted(original: Callable[..., Any], replacement: Callable[..., torch.Tensor],
              qualname: str) -> Callable[..., Any]:
    def rerouted(*args: Any, **kwargs: Any) -> Any:
        if _thread.rerouting:
            if not args and "input" in kwargs:  # F.silu(input=x): the replacements take x first
                args = (kwargs.pop("input"),)
            if args and isinstance(args[0], torch.Tensor) and args[0].is_cpu:
                return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    # Pickled by reference to this module (a model may hold one: transformers' GELU keeps
    # `self.act = F.gelu`), and introspection (help, inspect.signature) finds the original.
    rerouted.__module__ = __name__
    rerouted.__name__ = rerouted.__qualname__ = qualname
    rerouted.__doc__ = original.__doc__
    rerouted.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(rerouted, _ORIGINAL_ATTRIBUTE, original)
    return rerouted


def _install() -> None:
    wrappers: dict[int, Callable[..., Any]] = {}  # by id of the original: one per function
    for namespace, names in _REROUTED_NAMES.items():
        label = namespace.__name__.replace(".", "_")
        for name in names:
            original = _original(namespace, name)
            wrapper = wrappers.get(id(original))
            if wrapper is None:
                qualname = f"_rerouted_{label}_{name}"
                wrapper = _rerouted(original, _replacement(namespace, name), qualname)
                wrappers[id(original)] = globals()[qualname] = wrapper
            setattr(namespace, name, wrapper)


_install()


@contextmanager
def batch_invariant(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within this block, in this thread, a model on `device` computes each sample
    independently of its batch-mates, so an image is bit-identical alone or in any batch.

    Does nothing for a device other than the CPU: only CPU kernels are covered."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = _thread.rerouting
    _thread.rerouting = True
    try:
        yield
    finally:
        _thread.rerouting = previous


def is_active() -> bool:
    """Whether this thread is inside `batch_invariant()` for the CPU now."""
    return _thread.rerouting
