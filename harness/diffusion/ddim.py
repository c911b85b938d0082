"""Deterministic DDIM (eta = 0): the step, inversion and sampling with classifier-free guidance.

Notation as in Cho et al. (Eq. 3-4): alpha_t is the cumulative product of (1 - beta) (diffusers'
`alphas_cumprod`), eps the noise prediction. One step from timestep t to timestep s, in either direction:

    z0_hat = (z_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    z_s    = sqrt(alpha_s) z0_hat + sqrt(1 - alpha_s) eps

Sampling runs it with s < t (Eq. 3), inversion with s > t (Eq. 4), where inversion uses the noise predicted at
the current, less noisy latent. The schedule and timesteps come from diffusers' DDIMScheduler, so they are the
ones Stable Diffusion uses; the step itself is written out because the methods (Algorithm 1 of Cho et al.)
apply it to masked latents and mixed noise predictions.
"""
from __future__ import annotations

from typing import Callable

import torch

# eps_model(z_t, t, condition) -> predicted noise; t is an integer timestep
EpsModel = Callable[[torch.Tensor, int, object], torch.Tensor]


def alpha_at(scheduler, t: int) -> torch.Tensor:
    """alpha_t for a timestep; t < 0 is the clean end of the chain (the scheduler's final alpha)."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
    """Move z_t to the timestep whose cumulative alpha is alpha_s (towards noise if alpha_s < alpha_t)."""
    alpha_t = torch.as_tensor(alpha_t, dtype=z_t.dtype, device=z_t.device)
    alpha_s = torch.as_tensor(alpha_s, dtype=z_t.dtype, device=z_t.device)
    z0_hat = (z_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    return alpha_s.sqrt() * z0_hat + (1 - alpha_s).sqrt() * eps


def timesteps(scheduler, steps: int) -> list[int]:
    """The sampling timesteps, noisiest first (diffusers' DDIM spacing)."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def previous(scheduler, t: int, steps: int) -> int:
    """The timestep after t on the way to the data (-1 past the last one)."""
    return t - scheduler.config.num_train_timesteps // steps


def sample(eps_model: EpsModel, z_T: torch.Tensor, scheduler, steps: int, condition: object = None,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM sampling from z_T to z_0."""
    z = z_T
    for t in timesteps(scheduler, steps):
        eps = eps_model(z, t, condition)
        z = ddim_step(z, eps, alpha_at(scheduler, t), alpha_at(scheduler, previous(scheduler, t, steps)))
        if on_step is not None:
            on_step(t, z)
    return z


def invert(eps_model: EpsModel, z_0: torch.Tensor, scheduler, steps: int, condition: object = None) -> torch.Tensor:
    """DDIM inversion from z_0 to z_T: the reverse of `sample` over the same timesteps."""
    z = z_0
    for t in reversed(timesteps(scheduler, steps)):
        s = previous(scheduler, t, steps)  # the less noisy end of this step
        eps = eps_model(z, max(s, 0), condition)
        z = ddim_step(z, eps, alpha_at(scheduler, s), alpha_at(scheduler, t))
    return z


def guided(eps_model: EpsModel, scale: float) -> EpsModel:
    """Classifier-free guidance: condition = (conditional, unconditional); eps_u + scale (eps_c - eps_u)."""

    def eps(z: torch.Tensor, t: int, condition: tuple) -> torch.Tensor:
        conditional, unconditional = condition
        if scale == 1.0:
            return eps_model(z, t, conditional)
        e_c, e_u = eps_model(z, t, conditional), eps_model(z, t, unconditional)
        return e_u + scale * (e_c - e_u)

    return eps
