"""How FLUX.2 lays latents out for its transformer, and back again.

The VAE's latents (B, c, 2h, 2w) are patchified 2x2 into (B, 4c, h, w), normalised with the
VAE's latent batch-norm running statistics, and packed into a token sequence (B, h*w, 4c).
Every token carries a 4-D position id (T, H, W, L):

- text tokens:               (0, 0, 0, l)
- the image being generated: (0, h, w, 0)
- the i-th reference image:  (10 + 10 i, h, w, 0)

Decoding runs the same steps backwards. These are pure tensor functions shared by the
encoder, denoise and decoder stages; they take no components and touch no pipeline state.
"""

from __future__ import annotations

from typing import Any

import torch

from blocks import model_config

# The T coordinate of the i-th reference image is REFERENCE_TIME_SCALE * (i + 1).
REFERENCE_TIME_SCALE = 10


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, c, 2h, 2w) -> (B, 4c, h, w): each 2x2 patch becomes 4 channels."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch, channels * 4, height // 2, width // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4c, h, w) -> (B, c, 2h, 2w), the inverse of `patchify`."""
    batch, channels, height, width = latents.shape
    latents = latents.reshape(batch, channels // 4, 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // 4, height * 2, width * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), tokens in row-major order."""
    batch, channels, height, width = latents.shape
    return latents.reshape(batch, channels, height * width).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, S, C) tokens with (B, S, 4) ids -> (B, C, h, w), each token put where its (H, W)
    id says, so the result does not depend on the order of the sequence."""
    batch, _, channels = tokens.shape
    rows, cols = ids[..., 1].long(), ids[..., 2].long()  # (B, S)
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    flat = (rows * width + cols).unsqueeze(-1).expand(-1, -1, channels)  # (B, S, C)
    grid = tokens.new_zeros(batch, height * width, channels).scatter_(1, flat, tokens)
    return grid.permute(0, 2, 1).reshape(batch, channels, height, width)


def text_ids(batch_size: int, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, L, 4) int64 ids (0, 0, 0, l) of the text tokens."""
    zero = torch.arange(1)
    ids = torch.cartesian_prod(zero, zero, zero, torch.arange(seq_len))  # (L, 4)
    return ids.unsqueeze(0).repeat(batch_size, 1, 1).to(device)


def latent_ids(
    batch_size: int, height: int, width: int, device: torch.device | None = None
) -> torch.Tensor:
    """(B, h*w, 4) int64 ids (0, h, w, 0) of the image being generated."""
    zero = torch.arange(1)
    ids = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
    return ids.unsqueeze(0).expand(batch_size, -1, -1).to(device)


def reference_ids(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(1, S, 4) int64 ids of reference images of latent sizes [(h, w), ...], concatenated in
    order; image i gets T = 10 + 10 i so the transformer can tell the references apart."""
    ids = []
    for i, (height, width) in enumerate(sizes):
        t = torch.tensor([REFERENCE_TIME_SCALE * (i + 1)])
        ids.append(torch.cartesian_prod(t, torch.arange(height), torch.arange(width),
                                        torch.arange(1)))
    return torch.cat(ids).unsqueeze(0)


def _batch_norm_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent batch-norm mean and std as (1, 4c, 1, 1), on `like`'s device/dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def normalise(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """Patchified VAE latents (B, 4c, h, w) -> the transformer's normalised latent space."""
    mean, std = _batch_norm_stats(vae, latents)
    return (latents - mean) / std


def denormalise(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """The inverse of `normalise`."""
    mean, std = _batch_norm_stats(vae, latents)
    return latents * std + mean


def vae_scale_factor(components: Any) -> int:
    """Pixels per VAE latent: 2 ** (levels - 1) of the VAE, loaded or read from its config;
    8 (FLUX.2's VAE) when neither is available, as diffusers' pipeline assumes."""
    return model_config.vae_scale_factor(components, default=8)
