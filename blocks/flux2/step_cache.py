"""Step caching for FLUX.2's transformer: `fbcache` and `teacache` as hooks on its blocks.

The transformer runs: embeddings -> double-stream blocks -> single-stream blocks -> output
norm and projection. Hooks (see `blocks.step_cache.hooks` for the modes):

- `fbcache`: the first double-stream block is the probe: its image-stream residual (output
  minus input) decides. The probe forward stops right after it and keeps the block's outputs,
  which the step's real forward replays instead of recomputing. A full forward remembers what
  the remaining blocks added to the image stream (the input of the output norm minus the first
  block's output); a cached one skips them all and adds that residual back.
- `teacache`: the probe is the first block's timestep-modulated image input,
  `(1 + scale) * norm1(x) + shift`, computed from the block's own inputs; the probe stops
  before the block runs. A full forward remembers what all blocks added to the embedded image
  tokens; a cached one skips every block and adds that residual back.

Only image tokens (and reference image tokens, which travel with them) leave the transformer,
so the text stream needs no memory: a skipped block passes its inputs through unchanged.

Not handled here: decisions, grouping requests (`blocks.step_cache`), the denoise loop (which
is unchanged: caching lives entirely in these hooks).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from blocks.step_cache.hooks import (
    ModelCacheHooks,
    ProbeDone,
    current_call,
    wrap_forward,
)


def modulated_input(block: torch.nn.Module, hidden: torch.Tensor,
                    temb_mod_img: torch.Tensor) -> torch.Tensor:
    """What a double-stream block's attention reads of the image stream: `(1 + scale) *
    norm1(hidden) + shift` with the block's timestep modulation; teacache's probe (and the
    input of its rescaling fit, `bench/step_cache.py --fit-teacache`)."""
    (shift, scale, _), _ = Flux2Modulation.split(temb_mod_img, 2)
    return (1 + scale) * block.norm1(hidden) + shift  # (B, S, D)


class Flux2TransformerCacheHooks(ModelCacheHooks):
    model_class = Flux2Transformer2DModel
    methods = ("fbcache", "teacache")

    def wrap(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        if len(model.transformer_blocks) == 0:
            raise ValueError("step cache: a FLUX.2 transformer without double-stream blocks "
                             "has no first block to probe")
        first = model.transformer_blocks[0]
        rest = [*model.transformer_blocks[1:], *model.single_transformer_blocks]
        wrap_forward(model.x_embedder, self._embedded)
        wrap_forward(first, self._first_block(first))
        for block in rest:
            wrap_forward(block, self._later_block)
        wrap_forward(model.norm_out, self._output_norm)
        return [model.x_embedder, first, *rest, model.norm_out]

    @staticmethod
    def _embedded(original: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)  # (B, S, D) image (and reference) tokens
        call = current_call()
        if call is not None and call.method == "teacache" and call.mode != "probe":
            call.scratch["base"] = out
        return out

    @staticmethod
    def _first_block(block: torch.nn.Module) -> Any:
        def first_block(original: Any, *args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if call is None:
                return original(*args, **kwargs)
            hidden = kwargs["hidden_states"]  # (B, S, D)
            if call.method == "teacache":
                if call.mode == "probe":
                    call.keep_probe(modulated_input(block, hidden, kwargs["temb_mod_img"]))
                    raise ProbeDone
                if call.mode == "cached":
                    return kwargs["encoder_hidden_states"], hidden
                return original(*args, **kwargs)
            if call.mode == "probe":
                encoder_out, out = original(*args, **kwargs)
                call.keep_probe(out - hidden)
                for slot, enc, img in zip(call.slots, call.split(encoder_out), call.split(out),
                                          strict=True):
                    slot.replay = (enc, img)
                raise ProbeDone
            if all(slot.replay is not None for slot in call.slots):
                encoder_out = torch.cat([slot.replay[0] for slot in call.slots])
                out = torch.cat([slot.replay[1] for slot in call.slots])
            else:
                encoder_out, out = original(*args, **kwargs)
            call.scratch["base"] = out
            return encoder_out, out

        return first_block

    @staticmethod
    def _later_block(original: Any, *args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is None or call.mode != "cached":
            return original(*args, **kwargs)
        hidden = kwargs["hidden_states"]
        encoder = kwargs.get("encoder_hidden_states")
        if isinstance(kwargs.get("temb_mod"), torch.Tensor):  # single-stream block
            if kwargs.get("split_hidden_states"):
                text = kwargs["text_seq_len"]
                return hidden[:, :text], hidden[:, text:]
            return hidden if encoder is None else torch.cat([encoder, hidden], dim=1)
        return encoder, hidden  # double-stream block

    @staticmethod
    def _output_norm(original: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is not None and call.mode != "probe":
            base = call.scratch["base"]  # (B, S, D)
            if call.mode == "cached":
                hidden = base + call.gather("residual")
            else:
                call.keep("residual", hidden - base)
        return original(hidden, *args, **kwargs)
