"""The FLUX.2 [klein] denoise loop: one transformer prediction and one scheduler step per
timestep.

Reference image tokens, when present, are appended to the noisy image tokens for the
transformer and cut off its prediction again. With classifier-free guidance (base model,
`guidance_scale > 1`) the transformer runs twice, with the prompt and with the empty prompt,
as two separate calls exactly like the reference pipeline (batching them would change the
numerics). Progress, step callbacks and cancellation come from the framework's loop. The
transformer calls are a `blocks.stepping.StepForward`: a server can run one step of several
requests as one call per pass.
"""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

from blocks.block import ModularPipelineBlocks
from blocks.composites import LoopSequentialPipelineBlocks
from blocks.flux2.before_denoise import SCHEDULER_SPEC
from blocks.flux2.encoders import DEFAULT_GUIDANCE_SCALE, uses_guidance
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam
from blocks.stepping import ForwardBatch, ForwardRows, StepForward


class Flux2KleinLoopDenoiser(StepForward):
    model_name = "flux2-klein"
    description = (
        "Predicts the flow velocity with the transformer; with guidance also for the empty "
        "prompt, mixed as neg + scale * (cond - neg)."
    )
    expected_components = [
        ComponentSpec("transformer", Flux2Transformer2DModel, "FLUX.2's flow transformer."),
    ]
    expected_configs = [
        ConfigSpec("is_distilled", True, "Step-distilled checkpoint: no classifier-free guidance."),
    ]
    inputs = [
        InputParam("latents", torch.Tensor, required=True, description="(B, S, C) noisy tokens."),
        InputParam("latent_ids", torch.Tensor, required=True, description="(B, S, 4)."),
        InputParam("prompt_embeds", torch.Tensor, required=True, description="(B, L, E)."),
        InputParam("text_ids", torch.Tensor, required=True, description="(B, L, 4)."),
        InputParam("negative_prompt_embeds", torch.Tensor,
                   description="(B, L, E) empty-prompt embeddings; needed with guidance."),
        InputParam("negative_text_ids", torch.Tensor),
        InputParam("condition_latents", torch.Tensor,
                   description="(B, S_ref, C) reference image tokens, if any."),
        InputParam("condition_ids", torch.Tensor),
        InputParam("guidance_scale", float, default=DEFAULT_GUIDANCE_SCALE),
        InputParam("attention_kwargs", dict, description="Passed to the attention processors."),
    ]
    intermediate_outputs = [
        OutputParam("noise_pred", torch.Tensor, "(B, S, C) predicted velocity."),
    ]

    # One transformer call per pass (conditional, and unconditional with guidance), as in the
    # reference pipeline. Requests share a pass's call when their rows fit together: the same
    # transformer, token and embedding shapes, and the same position ids (the transformer
    # takes the ids of the first sample for the whole batch).
    def forward_rows(self, components, block_state, i: int, t: torch.Tensor):
        transformer = components.transformer
        latents = block_state.latents
        rows = latents.shape[0]
        timestep = t.expand(rows).to(latents.dtype) / 1000
        hidden_states, img_ids = latents, block_state.latent_ids
        if block_state.condition_latents is not None:
            hidden_states = torch.cat([latents, block_state.condition_latents], dim=1)
            img_ids = torch.cat([img_ids, block_state.condition_ids], dim=1)
        hidden_states = hidden_states.to(transformer.dtype)
        passes = [("cond", block_state.prompt_embeds, block_state.text_ids)]
        if uses_guidance(components, block_state.guidance_scale):
            if block_state.negative_prompt_embeds is None:
                raise ValueError(
                    f"{self.path}: guidance_scale {block_state.guidance_scale} needs "
                    "negative_prompt_embeds (the text encoder makes them for the base model)"
                )
            passes.append(("uncond", block_state.negative_prompt_embeds,
                           block_state.negative_text_ids))
        kwargs = block_state.attention_kwargs
        forwards = []
        for name, embeds, txt_ids in passes:
            key = (type(self), id(transformer), name, tuple(hidden_states.shape[1:]),
                   hidden_states.dtype, tuple(embeds.shape[1:]), _ids_key(img_ids),
                   _ids_key(txt_ids), None if kwargs is None else id(block_state))
            inputs = {"hidden_states": hidden_states, "timestep": timestep,
                      "encoder_hidden_states": embeds}
            options = {"pass": name, "img_ids": img_ids, "txt_ids": txt_ids,
                       "attention_kwargs": kwargs}
            forwards.append(ForwardRows(key, inputs, options))
        return forwards

    def forward(self, components, batch: ForwardBatch) -> torch.Tensor:
        transformer, options = components.transformer, batch.options
        with transformer.cache_context(options["pass"]):
            return transformer(
                hidden_states=batch.inputs["hidden_states"],
                timestep=batch.inputs["timestep"],
                guidance=None,
                encoder_hidden_states=batch.inputs["encoder_hidden_states"],
                txt_ids=options["txt_ids"],
                img_ids=options["img_ids"],
                joint_attention_kwargs=options["attention_kwargs"],
                return_dict=False,
            )[0]

    def take_outputs(self, components, block_state, outputs, i: int, t: torch.Tensor) -> None:
        num_tokens = block_state.latents.shape[1]
        # Drop the reference image tokens from each prediction.
        noise_pred = outputs[0][:, :num_tokens]
        if len(outputs) > 1:
            negative = outputs[1][:, :num_tokens]
            noise_pred = negative + block_state.guidance_scale * (noise_pred - negative)
        block_state.noise_pred = noise_pred


def _ids_key(ids: torch.Tensor) -> tuple:
    """Position ids as a hashable value: requests share a forward only with equal ids."""
    first = ids[0] if ids.ndim == 3 else ids
    return (tuple(first.shape), first.cpu().numpy().tobytes())


class Flux2KleinSchedulerStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = "Advances the latents by one flow-matching Euler step."
    expected_components = [SCHEDULER_SPEC]
    inputs = [
        InputParam("noise_pred", torch.Tensor, required=True),
        InputParam("latents", torch.Tensor, required=True),
    ]
    intermediate_outputs = [OutputParam("latents", torch.Tensor, "(B, S, C) less noisy tokens.")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        block_state.latents = components.scheduler.step(
            block_state.noise_pred, t, block_state.latents, return_dict=False
        )[0]
        return components, block_state


class Flux2KleinDenoiseLoop(LoopSequentialPipelineBlocks):
    model_name = "flux2-klein"
    description = "Denoises the latents: transformer prediction, then scheduler step, per timestep."
    loop_inputs = [
        InputParam("timesteps", torch.Tensor, required=True, description="From set_timesteps."),
    ]
    loop_intermediate_outputs = [OutputParam("latents", torch.Tensor, "(B, S, C) denoised.")]
    block_classes = [Flux2KleinLoopDenoiser, Flux2KleinSchedulerStep]
    block_names = ["denoiser", "scheduler_step"]
