"""`blocks.batch_invariance`: under `batch_invariant()`, an image made in a batch is bit-identical
to the same image made alone, for every family's real model classes at tiny size, at one and
two intra-op threads.

Without the mode these comparisons differ by ~1e-6 on this kind of CPU (oneDNN takes another
path for a lone image, MKL's small GEMMs and the scalar remainder of SIMD loops depend on the
batch's size), which is what the mode exists to remove.
"""

from __future__ import annotations

import pathlib
import pickle
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blocks import ModularPipeline
from blocks.batch_invariance import batch_invariant, is_active
from blocks.flux2.tiny_model import write_tiny_flux2_klein
from blocks.stable_diffusion.tiny_model import write_tiny_sd
from blocks.stable_diffusion_xl.tiny_model import write_tiny_sdxl

SHAPES_SD = pathlib.Path(__file__).resolve().parents[2] / "assets" / "tiny-shapes-sd"
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a blue triangle on a black background", "a yellow circle on a red background",
           "a white square on a green background"]


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _pipeline(path: pathlib.Path) -> ModularPipeline:
    pipe = ModularPipeline.from_pretrained(str(path))
    pipe.load_components(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModularPipeline]:
    folder = tmp_path_factory.mktemp("invariance")
    return {
        "sd": _pipeline(write_tiny_sd(folder / "sd")),
        "shapes-sd": _pipeline(SHAPES_SD),
        "flux2-klein": _pipeline(write_tiny_flux2_klein(folder / "flux2")),
        "sdxl": _pipeline(write_tiny_sdxl(folder / "sdxl")),
    }


def _images(pipe: ModularPipeline, prompts: list[str], seeds: list[int], size: int,
            **extra: object) -> np.ndarray:
    with batch_invariant():
        return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                    num_inference_steps=2, height=size, width=size, output_type="np",
                    output="images", **extra)


@pytest.mark.parametrize(("family", "size", "extra"), [
    ("sd", 32, {"guidance_scale": 7.5}),
    ("sd", 64, {"guidance_scale": 7.5, "negative_prompt": ["blurry"] * 5}),
    ("shapes-sd", 64, {"guidance_scale": 5.0}),
    ("flux2-klein", 32, {}),
    ("sdxl", 32, {"negative_prompt": ["blurry"] * 5, "negative_original_size": (16, 16)}),
])
def test_batched_image_is_bit_identical_to_alone(
    pipelines: dict[str, ModularPipeline], threads: int, family: str, size: int,
    extra: dict[str, object],
) -> None:
    pipe = pipelines[family]
    seeds = [11, 12, 13, 14, 15]
    batched = _images(pipe, PROMPTS, seeds, size, **extra)
    alone_extra = {k: v[:1] if isinstance(v, list) else v for k, v in extra.items()}
    for index in (0, 2, 4):  # first, middle and last row: the remainder of a loop sits last
        alone = _images(pipe, PROMPTS[index:index + 1], seeds[index:index + 1], size,
                        **alone_extra)
        assert np.array_equal(alone[0], batched[index]), (
            f"{family} {size}px, {threads} thread(s): image {index} differs by "
            f"{np.abs(alone[0] - batched[index]).max():.2e} batched vs alone")


def test_rerouted_ops_give_each_sample_its_alone_value(threads: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, 9, 9, generator=generator)
    tokens = torch.randn(7, 77, 37, generator=generator)
    cases = {
        "conv3x3": lambda t: F.conv2d(t, torch.ones(8, 16, 3, 3) / 9, torch.ones(8), padding=1),
        "conv1x1": lambda t: F.conv2d(t, torch.linspace(-1, 1, 128).reshape(8, 16, 1, 1)),
        "group_norm": lambda t: F.group_norm(t, 4),
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "sin": torch.sin,
        "gelu": lambda t: F.gelu(t, approximate="tanh"),
    }
    with batch_invariant():
        for name, op in cases.items():
            full = op(x)
            for row in (0, 3, 6):
                assert torch.equal(op(x[row:row + 1])[0], full[row]), name
        weight, bias = torch.randn(64, 37, generator=generator), torch.randn(64)
        full = F.linear(tokens, weight, bias)
        for row in (0, 6):
            assert torch.equal(F.linear(tokens[row:row + 1], weight, bias)[0], full[row])
        time_rows = torch.randn(7, 37, generator=generator)  # (N, K): one GEMM row per image
        full = F.linear(time_rows, weight, bias)
        assert torch.equal(F.linear(time_rows[6:], weight, bias)[0], full[6])


def test_gelu_split_between_threads_keeps_whole_steps(threads: int) -> None:
    # 20000 elements: below most ops' threading grain (32768), above gelu's (16384), so at two
    # threads gelu alone splits it, at row 10; each chunk must still be whole SIMD steps.
    x = torch.randn(20, 1000, generator=torch.Generator().manual_seed(0))
    with batch_invariant():
        full = F.gelu(x, approximate="tanh")
        for row in (9, 19):  # each ends a chunk
            assert torch.equal(F.gelu(x[row:row + 1], approximate="tanh")[0], full[row])


def test_values_stay_those_of_the_default_kernels_to_float_rounding() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 12, 12, generator=generator)
    weight = torch.randn(16, 8, 3, 3, generator=generator)
    default = F.silu(F.conv2d(x, weight, padding=1))
    with batch_invariant():
        invariant = F.silu(F.conv2d(x, weight, padding=1))
    assert invariant.shape == default.shape
    torch.testing.assert_close(invariant, default, rtol=1e-5, atol=1e-5)


def test_in_place_and_keyword_calls_keep_their_meaning() -> None:
    x = torch.randn(3, 50)
    with batch_invariant():
        for call, expected in (
            (lambda t: F.silu(t, inplace=True), F.silu),
            (lambda t: F.silu(t, True), F.silu),  # inplace given by position
            (lambda t: F.elu(t, 0.5, True), lambda t: F.elu(t, 0.5)),
            (lambda t: t.sigmoid_(), torch.sigmoid),
            (lambda t: t.exp_(), torch.exp),
        ):
            target = x.clone()
            want = expected(x.clone())
            out = call(target)
            assert out is target  # written into its input, as asked
            torch.testing.assert_close(target, want, rtol=1e-6, atol=1e-6)
        plain = x.clone()
        torch.testing.assert_close(F.silu(input=plain), F.silu(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(plain, x)  # out of place left its input alone
        assert torch.equal(F.linear(input=x, weight=torch.eye(50)), F.linear(x, torch.eye(50)))


def test_rerouting_is_per_thread_and_only_for_the_cpu() -> None:
    seen: list[bool] = []

    def other_thread() -> None:
        seen.append(is_active())

    with batch_invariant():
        assert is_active()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == [False] and not is_active()
    with batch_invariant("cuda"):  # not covered, so not entered
        assert not is_active()


class _KeepsItsActivation(torch.nn.Module):
    """Takes its function when built, like transformers' GELUActivation (`self.act = F.gelu`)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def test_functions_kept_by_a_model_are_rerouted_and_pickle() -> None:
    model = pickle.loads(pickle.dumps(_KeepsItsActivation()))  # the weight pool pickles modules
    x = torch.randn(40, 37, generator=torch.Generator().manual_seed(0))  # rows: not whole steps
    with batch_invariant():
        full = model(x)
        for row in range(40):
            assert torch.equal(model(x[row:row + 1])[0], full[row]), row


@pytest.mark.parametrize("threads", [2, 3])
def test_every_thread_chunk_is_whole_simd_steps(threads: int) -> None:
    # 40000 elements: above the threading grain, so 2 or 3 threads split it at element
    # 20000 or 13334, mid-row; padded, every chunk still holds whole SIMD steps, so each row
    # computes as it does alone.
    x = torch.randn(40, 1000, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with batch_invariant():
            full = F.silu(x)
            for row in range(40):
                assert torch.equal(F.silu(x[row:row + 1])[0], full[row]), row
    finally:
        torch.set_num_threads(previous)
