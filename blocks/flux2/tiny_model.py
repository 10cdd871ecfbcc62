"""A deterministic, random-weight FLUX.2 [klein] checkpoint at toy sizes.

``write_tiny_flux2_klein`` writes the standard diffusers layout (``model_index.json`` plus the
``transformer``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` subfolders) that
``diffusers.Flux2KleinPipeline.from_pretrained`` loads. The component classes and every config
switch that changes behaviour match the real FLUX.2-klein checkpoints; only the widths and
depths are shrunk, so that a 2-step 32x32 generation runs in a fraction of a second on a CPU.

Sizes that the pipeline itself constrains:

- the text encoder has 28 layers, because the pipeline stacks hidden states (9, 18, 27);
- the transformer's ``joint_attention_dim`` is 3x the text hidden size (three stacked layers);
- the transformer's ``in_channels`` is 4x the VAE latent channels (2x2 patchified latents);
- the VAE keeps four resolution levels, so ``vae_scale_factor`` is 8 as in the real VAE and
  image sizes round to multiples of 16 exactly as they do for the real model.

The tokenizer is a byte-level BPE trained offline on ``TINY_CORPUS`` and wrapped in the same
``Qwen2Tokenizer`` class (``Qwen2TokenizerFast`` is an alias of it) with Qwen3's special tokens
and a Qwen3-style chat template, so nothing is ever downloaded.

``size="real"`` writes FLUX.2-klein-4B's architecture instead, with random weights (bfloat16 by
default): its transformer (5 double-stream and 20 single-stream blocks, 24 heads of 128), its
32-channel VAE and Qwen3-4B as the text encoder (36 layers, width 2560, the full 151936-row
embedding; the toy tokenizer's ids index it). ``device="cuda"`` builds them there, which takes
seconds instead of a CPU's minutes.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AddedToken, Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from blocks.flux2.before_denoise import FLUX2_SCHEDULER_CONFIG
from blocks.tiny_checkpoint import (
    TINY_CORPUS,
    build_seeded,
    check_size,
    default_weight_dtype,
)

__all__ = ["write_tiny_flux2_klein"]

# --- Sizes --------------------------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 32
TEXT_NUM_LAYERS = 28  # hidden_states[27] must exist: 28 layers give 29 hidden states
TEXT_NUM_HEADS = 4
TEXT_NUM_KV_HEADS = 2  # grouped-query attention, as in Qwen3
TEXT_HEAD_DIM = 8
TEXT_INTERMEDIATE_SIZE = 64
# The pipeline pads every prompt to max_sequence_length (512 by default), so RoPE must cover it.
TEXT_MAX_POSITIONS = 512

VAE_LATENT_CHANNELS = 4
VAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16)  # four levels: vae_scale_factor = 2 ** 3 = 8

TRANSFORMER_NUM_HEADS = 2
TRANSFORMER_HEAD_DIM = 16
TRANSFORMER_AXES_DIMS_ROPE = (4, 4, 4, 4)  # (T, H, W, L) axes; must sum to the head dim

BPE_VOCAB_SIZE = 512  # 256 byte symbols + merges; the corpus runs out of merges before this


@dataclass(frozen=True)
class Flux2KleinArchitecture:
    """The widths and depths that differ between the tiny checkpoint and FLUX.2-klein-4B;
    every switch that changes behaviour is the real model's in both."""

    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_intermediate_size: int
    text_vocab_size: int | None  # None: the tokenizer's own vocabulary size
    text_max_positions: int
    transformer_layers: int
    transformer_single_layers: int
    transformer_heads: int
    transformer_head_dim: int
    transformer_axes_dims_rope: tuple[int, int, int, int]
    vae_latent_channels: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    vae_sample_size: int


ARCHITECTURES: dict[str, Flux2KleinArchitecture] = {
    "tiny": Flux2KleinArchitecture(
        text_hidden_size=TEXT_HIDDEN_SIZE,
        text_layers=TEXT_NUM_LAYERS,
        text_heads=TEXT_NUM_HEADS,
        text_kv_heads=TEXT_NUM_KV_HEADS,
        text_head_dim=TEXT_HEAD_DIM,
        text_intermediate_size=TEXT_INTERMEDIATE_SIZE,
        text_vocab_size=None,
        text_max_positions=TEXT_MAX_POSITIONS,
        transformer_layers=1,
        transformer_single_layers=1,
        transformer_heads=TRANSFORMER_NUM_HEADS,
        transformer_head_dim=TRANSFORMER_HEAD_DIM,
        transformer_axes_dims_rope=TRANSFORMER_AXES_DIMS_ROPE,
        vae_latent_channels=VAE_LATENT_CHANNELS,
        vae_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        vae_layers_per_block=1,
        vae_norm_num_groups=4,
        vae_sample_size=32,
    ),
    # black-forest-labs/FLUX.2-klein-4B's transformer and vae config.json; its text encoder is
    # Qwen3-4B's architecture (Qwen/Qwen3-4B config.json).
    "real": Flux2KleinArchitecture(
        text_hidden_size=2560,
        text_layers=36,
        text_heads=32,
        text_kv_heads=8,
        text_head_dim=128,
        text_intermediate_size=9728,
        text_vocab_size=151936,
        text_max_positions=40960,
        transformer_layers=5,
        transformer_single_layers=20,
        transformer_heads=24,
        transformer_head_dim=128,
        transformer_axes_dims_rope=(32, 32, 32, 32),
        vae_latent_channels=32,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_norm_num_groups=32,
        vae_sample_size=1024,
    ),
}

# Qwen3's added tokens, in Qwen3's order. ``special`` mirrors Qwen3's tokenizer_config.json:
# <tool_call>, <think> and friends are added but *not* special, so decoding keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# The subset of Qwen3's chat template that plain chats use (no tools, no reasoning_content).
# For a user message with add_generation_prompt=True and enable_thinking=False it renders
# exactly what the real template renders:
#   "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}"
    "{%- set content = message['content'] %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

def write_tiny_flux2_klein(
    out_dir: str | os.PathLike[str],
    *,
    base: bool = False,
    seed: int = 0,
    size: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> pathlib.Path:
    """Write a random-weight FLUX.2 [klein] checkpoint to ``out_dir`` and return its path.

    ``size``: "tiny" (toy widths) or "real" (FLUX.2-klein-4B's architecture); ``device``: where
    the models are built; ``dtype``: how the weights are saved (default float32 for tiny,
    bfloat16 for real).

    ``base=False`` writes the step-distilled variant (``is_distilled: true`` in
    ``model_index.json``: the pipeline ignores guidance), ``base=True`` the undistilled base
    variant (``is_distilled: false``: classifier-free guidance with an empty negative prompt
    whenever ``guidance_scale > 1``). The weights depend only on ``seed``, so two calls with
    the same arguments write byte-identical files.
    """
    check_size(size)
    arch = ARCHITECTURES[size]
    dtype = dtype or default_weight_dtype(size)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    # Seeds are offset per component so that changing one model's size never shifts another's
    # weights; the base variant shares the distilled variant's weights, only the flag differs.
    # fork_rng keeps the caller's global torch RNG (and the device's) untouched by the
    # manual_seed calls below. Each model goes to the CPU in `dtype` before the next is built,
    # so a GPU holds one real-size model at a time.
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type):
        text_encoder = _build_text_encoder(tokenizer, seed + 1, arch, device).to("cpu", dtype)
        transformer = _build_transformer(seed + 2, arch, device).to("cpu", dtype)
        vae = _build_vae(seed + 3, arch, device).to("cpu", dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX2_SCHEDULER_CONFIG)

    pipeline = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=not base,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    _normalise_model_index(out / "model_index.json")
    return out


def _build_tokenizer() -> Qwen2TokenizerFast:
    """Train a byte-level BPE on ``TINY_CORPUS`` and dress it up as Qwen3's tokenizer."""
    # Same normalizer / pre-tokenizer as Qwen2Tokenizer builds for itself, so that the merges
    # are learnt on exactly the pieces the final tokenizer will see.
    trainer_tokenizer = Tokenizer(BPE())
    trainer_tokenizer.normalizer = normalizers.NFC()
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # Every byte gets a token, so any prompt (not only corpus words) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The chat template's fixed words ("user", "assistant") are trained on too, so the
    # template around a prompt is a handful of tokens rather than dozens of bytes.
    corpus = [*TINY_CORPUS, "user assistant system"]
    trainer_tokenizer.train_from_iterator(corpus, trainer=trainer)

    model = json.loads(trainer_tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    # tokenizers >= 0.20 serialises merges as pairs; older versions as "a b" strings.
    merges = [
        tuple(merge) if isinstance(merge, list) else tuple(merge.split(" "))
        for merge in model["merges"]
    ]

    # The special tokens are named only after the added tokens exist: the constructor would
    # otherwise add eos/pad first and <|im_end|> would precede <|endoftext|>, unlike Qwen3.
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
    )
    # Added tokens get ids after the BPE vocabulary, in Qwen3's order, like the real tokenizer.
    tokenizer.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
            for content, special in QWEN3_ADDED_TOKENS
        ]
    )
    # Qwen3: eos is <|im_end|>, pad is <|endoftext|> (the pipeline pads prompts to
    # max_sequence_length with it, on the right), there is no bos and no unk.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _build_text_encoder(
    tokenizer: Qwen2TokenizerFast, seed: int, arch: Flux2KleinArchitecture, device: torch.device
) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=arch.text_vocab_size or len(tokenizer),
        hidden_size=arch.text_hidden_size,
        intermediate_size=arch.text_intermediate_size,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads,
        head_dim=arch.text_head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.text_max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        attention_bias=False,
        tie_word_embeddings=True,  # as in Qwen3-4B, the text encoder of FLUX.2-klein-4B
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return build_seeded(seed, lambda: Qwen3ForCausalLM(config), device)


def _build_transformer(
    seed: int, arch: Flux2KleinArchitecture, device: torch.device
) -> Flux2Transformer2DModel:
    return build_seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * arch.vae_latent_channels,
        out_channels=None,
        num_layers=arch.transformer_layers,
        num_single_layers=arch.transformer_single_layers,
        attention_head_dim=arch.transformer_head_dim,
        num_attention_heads=arch.transformer_heads,
        joint_attention_dim=3 * arch.text_hidden_size,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=arch.transformer_axes_dims_rope,
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,  # klein has no guidance embedding (distilled or not)
    ), device)


def _build_vae(seed: int, arch: Flux2KleinArchitecture, device: torch.device) -> AutoencoderKLFlux2:
    levels = len(arch.vae_block_out_channels)
    # The latent batch-norm starts at mean 0 / var 1; build_seeded re-draws it, which makes the
    # pipeline's (de)normalisation with its running stats observable in outputs.
    return build_seeded(seed, lambda: AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=arch.vae_block_out_channels,
        layers_per_block=arch.vae_layers_per_block,
        act_fn="silu",
        latent_channels=arch.vae_latent_channels,
        norm_num_groups=arch.vae_norm_num_groups,
        sample_size=arch.vae_sample_size,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=1e-4,
        batch_norm_momentum=0.1,
        patch_size=(2, 2),
    ), device)


def _normalise_model_index(path: pathlib.Path) -> None:
    """Name the tokenizer class as the real checkpoints do.

    transformers 5 aliases ``Qwen2TokenizerFast`` to ``Qwen2Tokenizer``, so ``save_pretrained``
    records the latter; the released FLUX.2-klein ``model_index.json`` says
    ``Qwen2TokenizerFast``, and both load, so follow the real file.
    """
    index = json.loads(path.read_text())
    index["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
