"""A deterministic, random-weight, toy-sized Stable Diffusion 1.x checkpoint factory.

``write_tiny_sd`` writes a checkpoint in diffusers' standard folder layout (``model_index.json``
plus one subfolder per component) so that diffusers' own pipelines and blockserve's blocks load
the very same files and can be compared for exact numerical parity. Every model is a real class
(``CLIPTextModel``, ``UNet2DConditionModel``, ``AutoencoderKL``, ``ControlNetModel``,
``DepthAnythingForDepthEstimation``) at a size where a 2-step 64x64 generation costs a few tens
of milliseconds on a CPU.

Optional extras:

- ``controlnet=True`` adds a ``controlnet`` subfolder with a ``ControlNetModel`` that fits the
  UNet. It is not listed in ``model_index.json`` (diffusers' SD pipelines ignore unlisted
  folders); load it with ``ControlNetModel.from_pretrained(out_dir / "controlnet")``.
- ``depth=True`` adds a ``depth_processor`` subfolder with a ``DepthAnythingForDepthEstimation``
  (tiny Dinov2 backbone) and its ``DPTImageProcessor`` config; transformers resolves that name
  to ``DPTImageProcessorPil`` when torchvision is absent.
- ``inpaint=True`` makes the UNet take 9 input channels (latents, mask, masked-image latents)
  and names ``StableDiffusionInpaintPipeline`` in ``model_index.json``.
- ``size="real"`` writes SD 1.5's architecture instead (CLIP ViT-L/14 text tower, the 860M
  UNet, the 84M VAE, ControlNet at UNet size) with random weights, in bfloat16 by default, for
  GPU checks; the tokenizer stays the toy one (its ids index the full 49408-row embedding).
  ``device="cuda"`` builds the models there, which takes seconds instead of a CPU's minutes.

Same arguments, same bytes: every model is built under its own seed, and the tokenizer is
trained by a small deterministic BPE trainer written here (see ``_train_bpe_merges`` for why not
the ``tokenizers`` trainer).
"""

from __future__ import annotations

import itertools
import json
import pathlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, normalizers, pre_tokenizers

from blocks.tiny_checkpoint import (
    TINY_CORPUS,
    build_seeded,
    check_size,
    default_weight_dtype,
)

# ---------------------------------------------------------------------------------------------
# Sizes. The VAE has 3 levels, so diffusers derives vae_scale_factor = 2 ** (3 - 1) = 4: a 32x32
# image has 8x8 latents and a 64x64 image 16x16 latents. The UNet's sample_size of 8 therefore
# makes the pipelines' default resolution 32x32.
# ---------------------------------------------------------------------------------------------
TEXT_HIDDEN_SIZE = 32
TEXT_LAYERS = 3  # >= 3 so that clip_skip=1 and clip_skip=2 pick distinct, non-final layers
TEXT_HEADS = 4
TEXT_INTERMEDIATE_SIZE = 37  # deliberately not a multiple of anything, to catch shape slips
MODEL_MAX_LENGTH = 77

UNET_BLOCK_OUT_CHANNELS = (32, 64)
UNET_SAMPLE_SIZE = 8
NORM_NUM_GROUPS = 8
ATTENTION_HEAD_DIM = 2  # diffusers' SD1.x quirk: this is the number of heads (16 and 32 dims)

VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
VAE_SCALING_FACTOR = 0.18215  # SD 1.x's value; kept so latents are scaled as in the real model

# Two stride-2 convs, matching VAE_SCALE_FACTOR, bring the control image to latent resolution.
CONTROLNET_CONDITIONING_CHANNELS = (8, 16, 16)

DEPTH_PATCH_SIZE = 4
DEPTH_IMAGE_SIZE = 32
DEPTH_HIDDEN_SIZE = 16
# Linear/conv init std for the depth model (transformers' default is 0.02). The DPT neck and
# fusion stages shrink a 0.02-initialised signal to ~1e-4 by the head; 0.1 keeps it ~1e-2.
DEPTH_INIT_RANGE = 0.1

# The CLIP tokenizer's pre-tokenisation regex (as in openai/CLIP and transformers' CLIPTokenizer).
_CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_MAX_MERGES = 400
_MIN_PAIR_COUNT = 2  # pairs seen once stay unmerged, so unseen words split into sub-words


@dataclass(frozen=True)
class SDArchitecture:
    """The widths and depths that differ between the tiny checkpoint and SD 1.5; every other
    switch (activations, norms, attention layout, noise schedule) is SD 1.x's in both."""

    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    text_vocab_size: int | None  # None: the tokenizer's own vocabulary size
    # One entry per UNet level; every level but the lowest has cross-attention, as in SD 1.x.
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_head_dim: int  # diffusers' SD 1.x quirk: the number of heads
    unet_sample_size: int  # latent side of the default resolution
    norm_num_groups: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    controlnet_conditioning_channels: tuple[int, ...]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)


ARCHITECTURES: dict[str, SDArchitecture] = {
    "tiny": SDArchitecture(
        text_hidden_size=TEXT_HIDDEN_SIZE,
        text_layers=TEXT_LAYERS,
        text_heads=TEXT_HEADS,
        text_intermediate_size=TEXT_INTERMEDIATE_SIZE,
        text_vocab_size=None,
        unet_block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        unet_layers_per_block=1,
        attention_head_dim=ATTENTION_HEAD_DIM,
        unet_sample_size=UNET_SAMPLE_SIZE,
        norm_num_groups=NORM_NUM_GROUPS,
        vae_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        vae_layers_per_block=1,
        controlnet_conditioning_channels=CONTROLNET_CONDITIONING_CHANNELS,
    ),
    # runwayml/stable-diffusion-v1-5: text_encoder, unet and vae config.json.
    "real": SDArchitecture(
        text_hidden_size=768,
        text_layers=12,
        text_heads=12,
        text_intermediate_size=3072,
        text_vocab_size=49408,
        unet_block_out_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        attention_head_dim=8,
        unet_sample_size=64,
        norm_num_groups=32,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        controlnet_conditioning_channels=(16, 32, 96, 256),
    ),
}

# Seed offsets per component: each model gets ``torch.manual_seed(seed + offset)``.
_SEED_TEXT_ENCODER = 0
_SEED_UNET = 1
_SEED_VAE = 2
_SEED_CONTROLNET = 3
_SEED_DEPTH = 4


def write_tiny_sd(
    out_dir: str | pathlib.Path,
    *,
    controlnet: bool = False,
    depth: bool = False,
    inpaint: bool = False,
    seed: int = 0,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write a random-weight SD 1.x checkpoint to ``out_dir`` and return its path.

    ``size``: "tiny" (toy widths) or "real" (SD 1.5's architecture); ``device``: where the
    models are built; ``dtype``: how the weights are saved (default float32 for tiny, bfloat16
    for real). ``out_dir`` must be missing or empty, so a stale component can never survive a
    rewrite. The same arguments always produce byte-identical files.
    """
    check_size(size)
    if depth and size != "tiny":
        raise ValueError("depth: the depth estimator exists at size 'tiny' only")
    arch = ARCHITECTURES[size]
    dtype = dtype or default_weight_dtype(size)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)

    vocab = write_clip_tokenizer(out / "tokenizer")

    def save(folder: str, seed: int, make: Callable[[], torch.nn.Module]) -> None:
        # One model at a time, on the CPU in `dtype` before the next is built.
        build_seeded(seed, make, device).to("cpu", dtype).save_pretrained(
            out / folder, safe_serialization=True)

    save("text_encoder", seed + _SEED_TEXT_ENCODER, text_encoder_model(arch, vocab))
    _rename_text_encoder_weights(out / "text_encoder")
    save("unet", seed + _SEED_UNET, unet_model(arch, in_channels=9 if inpaint else 4))
    save("vae", seed + _SEED_VAE, vae_model(arch))
    _write_scheduler(out / "scheduler")
    if controlnet:
        # build_seeded's re-draw also wakes up the zero-initialised convs (controlnet_down_blocks,
        # controlnet_mid_block, controlnet_cond_embedding.conv_out): the residuals are non-zero.
        save("controlnet", seed + _SEED_CONTROLNET, controlnet_model(arch))
    if depth:
        _write_depth(out / "depth_processor", seed + _SEED_DEPTH)
    write_sd_model_index(
        out,
        pipeline_class="StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
    )
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-character table, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _pretokenize(text: str) -> list[str]:
    """Split ``text`` into byte-level words exactly as CLIPTokenizer does before BPE."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def _train_bpe_merges(corpus: tuple[str, ...]) -> list[tuple[str, str]]:
    """Learn BPE merges over ``corpus`` with CLIP's ``</w>`` end-of-word convention.

    The ``tokenizers`` package's ``BpeTrainer`` breaks count ties in Rust hash-map order, which
    is randomised per process, so two runs can disagree on the merges. On a tiny corpus ties
    are everywhere, hence this plain trainer: most frequent pair first, ties broken by the
    pair's text, stopping at pairs seen fewer than ``_MIN_PAIR_COUNT`` times.
    """
    word_counts: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for word in _pretokenize(line):
            word_counts[(*word[:-1], word[-1] + _END_OF_WORD)] += 1

    merges: list[tuple[str, str]] = []
    while len(merges) < _MAX_MERGES:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in word_counts.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < _MIN_PAIR_COUNT:
            break
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in word_counts.items():
            merged[_apply_merge(symbols, best)] += count
        word_counts = merged
    return merges


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Lay the vocabulary out as openai/CLIP does: 256 byte characters, the same with ``</w>``,
    one token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last."""
    byte_chars = list(_bytes_to_unicode().values())
    merges = _train_bpe_merges(TINY_CORPUS)
    tokens = byte_chars + [c + _END_OF_WORD for c in byte_chars]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("BPE produced a duplicate token")  # a merge can't repeat; be sure
    return vocab, merges


def write_clip_tokenizer(folder: pathlib.Path) -> dict[str, int]:
    """Write the tiny offline CLIP tokenizer as the four files an SD 1.x ``tokenizer`` folder
    has (no ``tokenizer.json``); returns its vocabulary."""
    vocab, merges = _build_clip_vocab()
    folder.mkdir()
    # In id order, as CLIP's own vocab.json (dicts keep insertion order).
    _write_json(folder / "vocab.json", vocab, indent=None, sort_keys=False)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,  # SD 1.x pads with <|endoftext|> (SD 2.x uses "!")
        "unk_token": EOS_TOKEN,
    }
    _write_json(folder / "special_tokens_map.json", special)
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(folder / "tokenizer_config.json", config)
    return vocab


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


# Each returns the constructor call `build_seeded` runs (on any device, "meta" included).


def text_encoder_model(arch: SDArchitecture, vocab: dict[str, int]) -> Callable[[], Any]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=arch.text_vocab_size or len(vocab),
        hidden_size=arch.text_hidden_size,
        intermediate_size=arch.text_intermediate_size,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",  # CLIP ViT-L/14's text tower, as in SD 1.x
        layer_norm_eps=1e-5,
        projection_dim=arch.text_hidden_size,
        # The real ids (SD 1.x's config says 0/2, which makes CLIP pool at argmax(input_ids)).
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return lambda: CLIPTextModel(config)


def _rename_text_encoder_weights(folder: pathlib.Path) -> None:
    """Real SD checkpoints name the weights "text_model.embeddings...", as CLIPTextModel did
    before transformers 5 flattened it. transformers 5 still loads that layout (it strips the
    prefix) but saves a fresh model without it; rewrite the weights in the hub layout so that
    loaders meet the key names real checkpoints have."""
    weights = folder / "model.safetensors"
    renamed = folder / "model.safetensors.renamed"
    # Written beside and moved over: the tensors read may be views of the old file's pages.
    with safe_open(weights, framework="pt") as handle:
        state = {f"text_model.{name}": handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        save_file(state, renamed, metadata={"format": "pt"})
    renamed.replace(weights)


def _unet_like_kwargs(arch: SDArchitecture) -> dict[str, Any]:
    """Architecture arguments the UNet and its ControlNet must share."""
    levels = len(arch.unet_block_out_channels)
    return {
        # Mirrors SD 1.x: attention at the high-resolution levels, none at the lowest.
        "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        "block_out_channels": arch.unet_block_out_channels,
        "layers_per_block": arch.unet_layers_per_block,
        "cross_attention_dim": arch.text_hidden_size,
        "attention_head_dim": arch.attention_head_dim,
        "norm_num_groups": arch.norm_num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,  # SD 1.x: 1x1 conv proj_in/proj_out (SD 2.x: linear)
    }


def unet_model(arch: SDArchitecture, in_channels: int = 4) -> Callable[[], Any]:
    from diffusers import UNet2DConditionModel

    levels = len(arch.unet_block_out_channels)
    return lambda: UNet2DConditionModel(
        sample_size=arch.unet_sample_size,
        in_channels=in_channels,
        out_channels=4,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        **_unet_like_kwargs(arch),
    )


def vae_model(arch: SDArchitecture) -> Callable[[], Any]:
    from diffusers import AutoencoderKL

    levels = len(arch.vae_block_out_channels)
    return lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=arch.vae_block_out_channels,
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.unet_sample_size * arch.vae_scale_factor,
        scaling_factor=VAE_SCALING_FACTOR,
    )


def controlnet_model(arch: SDArchitecture) -> Callable[[], Any]:
    from diffusers import ControlNetModel

    return lambda: ControlNetModel(
        in_channels=4,
        conditioning_channels=3,
        conditioning_embedding_out_channels=arch.controlnet_conditioning_channels,
        **_unet_like_kwargs(arch),
    )


def _write_depth(folder: pathlib.Path, seed: int) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=DEPTH_IMAGE_SIZE,
        patch_size=DEPTH_PATCH_SIZE,
        hidden_size=DEPTH_HIDDEN_SIZE,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        initializer_range=DEPTH_INIT_RANGE,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=DEPTH_PATCH_SIZE,
        reassemble_hidden_size=DEPTH_HIDDEN_SIZE,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
        initializer_range=DEPTH_INIT_RANGE,
    )
    model = build_seeded(seed, lambda: DepthAnythingForDepthEstimation(config))
    _calibrate_depth_head(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    # Depth Anything's own preprocessing, scaled down: keep the aspect ratio, snap to a
    # multiple of the patch size, bicubic resize, ImageNet normalisation.
    processor = {
        "do_normalize": True,
        "do_pad": False,
        "do_rescale": True,
        "do_resize": True,
        "ensure_multiple_of": DEPTH_PATCH_SIZE,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "DPTImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "keep_aspect_ratio": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": DEPTH_IMAGE_SIZE, "width": DEPTH_IMAGE_SIZE},
    }
    _write_json(folder / "preprocessor_config.json", processor)


@torch.no_grad()
def _calibrate_depth_head(model: torch.nn.Module, seed: int) -> None:
    """Rescale the head's last conv so its pre-ReLU output has unit spread and is mostly > 0.

    A random relative-depth head often lands below zero almost everywhere, and the final ReLU
    then outputs a blank map. Like LSUV initialisation, one forward pass on a seeded input sets
    ``conv3`` so that its output is ``(p - q10(p)) / std(p)``: about 90% of pixels clear the
    ReLU and the map varies with the input.
    """
    conv = model.head.conv3
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda _m, _i, output: captured.append(output))
    generator = torch.Generator().manual_seed(seed)
    size = (1, 3, DEPTH_IMAGE_SIZE, DEPTH_IMAGE_SIZE)
    model(pixel_values=torch.randn(size, generator=generator))
    hook.remove()
    pre_activation = captured[0].flatten()
    # Rounded to 3 significant digits: the forward pass's last bits may depend on the CPU's
    # kernels and thread count, and the written bytes must not.
    scale = float(f"{float(pre_activation.std()):.3g}")
    shift = float(f"{float(torch.quantile(pre_activation, 0.1)):.3g}")
    conv.weight.div_(scale)
    conv.bias.sub_(shift).div_(scale)


def _write_scheduler(folder: pathlib.Path) -> None:
    from diffusers import EulerDiscreteScheduler

    # SD 1.x's noise schedule; "leading" spacing + steps_offset 1 is how SD 1.x picks timesteps.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    scheduler.save_pretrained(folder)


def write_sd_model_index(
    out: pathlib.Path,
    *,
    pipeline_class: str = "StableDiffusionPipeline",
    scheduler_class: str = "EulerDiscreteScheduler",
) -> None:
    """Write an SD checkpoint's model_index.json as diffusers' ``save_pretrained`` would
    (sorted keys, indent 2): CLIP text encoder and tokenizer, UNet, VAE, no safety checker."""
    import diffusers

    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(out / "model_index.json", index)


def _write_json(
    path: pathlib.Path, data: object, *, indent: int | None = 2, sort_keys: bool = True
) -> None:
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
