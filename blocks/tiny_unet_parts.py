"""Parts the tiny checkpoints of UNet latent-diffusion families (SD 1.x/2.x, SDXL) share.

- A CLIP tokenizer trained here, offline, on `TINY_CORPUS` with a small deterministic BPE
  trainer (see `_train_bpe_merges` for why not the ``tokenizers`` trainer), laid out as
  openai/CLIP's vocabulary; it loads as transformers' `CLIPTokenizer`.
- CLIP text encoder configs with the real token ids, and the key names real checkpoints give
  their weights.
- An `AutoencoderKL` constructor and SD's `EulerDiscreteScheduler` noise schedule.

Not handled here: widths and depths (each family's tiny model picks its own, tiny or real).
"""

from __future__ import annotations

import itertools
import pathlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, normalizers, pre_tokenizers

from blocks.tiny_checkpoint import TINY_CORPUS, write_json

# The CLIP tokenizer's pre-tokenisation regex (as in openai/CLIP and transformers' CLIPTokenizer).
_CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_END_OF_WORD = "</w>"
_MAX_MERGES = 400
_MIN_PAIR_COUNT = 2  # pairs seen once stay unmerged, so unseen words split into sub-words


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


def build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
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


def write_clip_tokenizer(
    folder: pathlib.Path,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    pad_token: str = EOS_TOKEN,
) -> None:
    """Write the four files a CLIP ``tokenizer`` folder of a diffusers checkpoint has (no
    ``tokenizer.json``). SD 1.x pads with ``<|endoftext|>``, SD 2.x and SDXL's second
    tokenizer with ``"!"``."""
    folder.mkdir()
    # In id order, as CLIP's own vocab.json (dicts keep insertion order).
    write_json(folder / "vocab.json", vocab, indent=None, sort_keys=False)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    write_json(folder / "special_tokens_map.json", special)
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    write_json(folder / "tokenizer_config.json", config)


def rename_clip_text_weights(folder: pathlib.Path) -> None:
    """Name a saved CLIP text model's weights "text_model.*", as real checkpoints do.

    transformers 5 flattened `CLIPTextModel` and saves a fresh one without the prefix (it still
    loads both layouts); `CLIPTextModelWithProjection` keeps it, and is left as it is.
    """
    weights = folder / "model.safetensors"
    renamed = folder / "model.safetensors.renamed"
    with safe_open(weights, framework="pt") as handle:
        names = list(handle.keys())
        if all(name.startswith("text_model.") or name.startswith("text_projection.")
               for name in names):
            return
        # Written beside and moved over: the tensors read may be views of the old file's pages.
        state = {f"text_model.{name}": handle.get_tensor(name) for name in names}
        save_file(state, renamed, metadata={"format": "pt"})
    renamed.replace(weights)


def clip_text_config(
    vocab: dict[str, int],
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    hidden_act: str,
    projection_dim: int,
    vocab_size: int | None = None,
) -> Any:
    """A `CLIPTextConfig` for the tiny vocabulary (or `vocab_size` rows), with its real
    special-token ids.

    (Real SD checkpoints' configs say bos/eos 0/2, which makes CLIP pool at argmax(input_ids),
    the id of `<|endoftext|>` in the real vocabulary; the real ids make it pool at the first
    `<|endoftext|>`, the same place.)
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size or len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def kl_vae_model(
    *,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    sample_size: int,
    scaling_factor: float,
) -> Callable[[], Any]:
    """The constructor call of an `AutoencoderKL` with 4 latent channels, for `build_seeded`."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def write_sd_scheduler(folder: pathlib.Path) -> None:
    """SD 1.x's (and SDXL's) noise schedule in an `EulerDiscreteScheduler`; "leading" spacing
    with steps_offset 1 is how both pick their timesteps."""
    from diffusers import EulerDiscreteScheduler

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
