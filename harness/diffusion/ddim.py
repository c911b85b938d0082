"""DDIM: the step (deterministic, or stochastic with eta > 0), inversion, sampling, blended sampling that keeps a
known image outside a mask, classifier-free guidance, and sampling with any diffusers scheduler by name.

Notation as in Cho et al. (Eq. 3-4): alpha_t is the cumulative product of (1 - beta) (diffusers'
`alphas_cumprod`), eps the noise prediction. One step from timestep t to timestep s, in either direction:

    z0_hat = (z_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    z_s    = sqrt(alpha_s) z0_hat + sqrt(1 - alpha_s - sigma^2) eps + sigma noise,
    sigma  = eta sqrt((1 - alpha_s) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_s)   (Song et al., Eq. 16)

Sampling runs it with s < t (Eq. 3), inversion with s > t and eta = 0 (Eq. 4), where inversion uses the noise
predicted at the current, less noisy latent. The schedule and timesteps come from diffusers' DDIMScheduler, so
they are the ones Stable Diffusion uses; the step itself is written out because the methods (Algorithm 1 of Cho
et al.) apply it to masked latents and mixed noise predictions.

Every function here takes noise predictions. A UNet trained to predict the velocity v = sqrt(alpha_t) eps -
sqrt(1 - alpha_t) z_0 instead (SD 2.x; the tiny backbone with `prediction_type: v_prediction`) gives its noise through
`predicted_noise`, and learns `training_target`; both read the scheduler's `prediction_type`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# eps_model(z_t, t, condition) -> predicted noise; t is an integer timestep
EpsModel = Callable[[torch.Tensor, int, object], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet may be trained to output: the noise, or v


def predicts_velocity(scheduler) -> bool:
    """Whether the UNet paired with this scheduler outputs v (v-prediction) rather than the noise."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported (one of {PREDICTION_TYPES})")
    return kind == "v_prediction"


def _alphas(scheduler, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """alpha_t per sample of `like` (t: an int, or one timestep per sample), shaped to broadcast over it."""
    alphas = scheduler.alphas_cumprod.to(like.device, like.dtype)[torch.as_tensor(t, device=like.device)]
    return alphas.reshape(-1, *([1] * (like.dim() - 1))) if alphas.dim() else alphas


def training_target(scheduler, z_0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """What the UNet learns to output for z_t = sqrt(alpha_t) z_0 + sqrt(1 - alpha_t) noise: the noise, or
    v = sqrt(alpha_t) noise - sqrt(1 - alpha_t) z_0 (diffusers' `get_velocity`). On a v-prediction backbone a
    paper's noise loss ||eps - eps_theta||^2 becomes ||v - v_theta||^2 = ||eps - eps_theta||^2 / alpha_t, as
    diffusers' training scripts do."""
    if not predicts_velocity(scheduler):
        return noise
    a = _alphas(scheduler, t, z_0)
    return a.sqrt() * noise - (1 - a).sqrt() * z_0


def predicted_noise(scheduler, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """The noise a UNet's `output` at z_t predicts: the output itself, or sqrt(alpha_t) v + sqrt(1 - alpha_t) z_t."""
    if not predicts_velocity(scheduler):
        return output
    a = _alphas(scheduler, t, z_t)
    return a.sqrt() * output + (1 - a).sqrt() * z_t


def alpha_at(scheduler, t: int) -> torch.Tensor:
    """alpha_t for a timestep; t < 0 is the clean end of the chain (the scheduler's final alpha)."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Move z_t to the timestep whose cumulative alpha is alpha_s (towards noise if alpha_s < alpha_t); with
    eta > 0 (sampling only) a share sigma of fresh `noise` replaces part of the predicted noise."""
    alpha_t = torch.as_tensor(alpha_t, dtype=z_t.dtype, device=z_t.device)
    alpha_s = torch.as_tensor(alpha_s, dtype=z_t.dtype, device=z_t.device)
    z0_hat = (z_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if eta == 0:
        return alpha_s.sqrt() * z0_hat + (1 - alpha_s).sqrt() * eps
    if noise is None:
        raise ValueError("a DDIM step with eta > 0 needs noise")
    sigma = eta * ((1 - alpha_s) / (1 - alpha_t)).sqrt() * (1 - alpha_t / alpha_s).sqrt()
    return alpha_s.sqrt() * z0_hat + (1 - alpha_s - sigma ** 2).sqrt() * eps + sigma * noise


def timesteps(scheduler, steps: int) -> list[int]:
    """The sampling timesteps, noisiest first (diffusers' DDIM spacing)."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def previous(scheduler, t: int, steps: int) -> int:
    """The timestep after t on the way to the data (-1 past the last one)."""
    return t - scheduler.config.num_train_timesteps // steps


def sample(eps_model: EpsModel, z_T: torch.Tensor, scheduler, steps: int, condition: object = None,
           on_step: Callable[[int, torch.Tensor], None] | None = None, eta: float = 0.0,
           generator: Generators = None) -> torch.Tensor:
    """DDIM sampling from z_T to z_0 (eta > 0: stochastic, with noise drawn from `generator`, one for the batch or
    one per sample)."""
    z = z_T
    for t in timesteps(scheduler, steps):
        eps = eps_model(z, t, condition)
        noise = _randn_like(z, generator) if eta > 0 else None
        z = ddim_step(z, eps, alpha_at(scheduler, t), alpha_at(scheduler, previous(scheduler, t, steps)), eta, noise)
        if on_step is not None:
            on_step(t, z)
    return z


BLENDS = ("after", "before")


def blended_sample(eps_model: EpsModel, z_T: torch.Tensor, known: torch.Tensor,
                   mask: torch.Tensor | Callable[[int], torch.Tensor], scheduler, steps: int, condition: object = None,
                   eta: float = 0.0, generator: Generators = None, blend: str = "after") -> torch.Tensor:
    """Inpainting-style sampling (blended latent diffusion): the latent outside `mask` (1 inside, 0 outside,
    broadcastable; or a function of the timestep giving it) is replaced by the known latent re-noised to the level
    of a step, so only the masked region is generated, in context.

    blend "after": after every step, at the level it reached; the result holds the known latent itself outside the
    mask. "before": before every UNet call, at the call's own timestep, and not after the last step (AnomalyDiffusion's
    sampler: the result's outside is the model's last step from the re-noised known latent, not the known latent)."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, not {blend!r}")
    mask_at = mask if callable(mask) else (lambda _t: mask)
    z = z_T
    for t in timesteps(scheduler, steps):
        s = previous(scheduler, t, steps)
        if blend == "before":
            z = _blend(z, known, mask_at(t), t, scheduler, generator)
        noise = _randn_like(z, generator) if eta > 0 else None
        z = ddim_step(z, eps_model(z, t, condition), alpha_at(scheduler, t), alpha_at(scheduler, s), eta, noise)
        if blend == "after":
            z = _blend(z, known, mask_at(t), s, scheduler, generator)
    return z


def _blend(z: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, t: int, scheduler,
           generator: Generators) -> torch.Tensor:
    """mask * z + (1 - mask) * q_sample(known, t) (t < 0: the known latent itself)."""
    alpha = torch.as_tensor(alpha_at(scheduler, t), dtype=z.dtype, device=z.device)
    renoised = known if t < 0 else alpha.sqrt() * known + (1 - alpha).sqrt() * _randn_like(z, generator)
    return mask * z + (1 - mask) * renoised


def _randn_like(z: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Noise drawn on the CPU (the same numbers on every device) and moved to z's device; with one generator per
    sample, each row from its own (so a sample's noise does not depend on the batch it is drawn in)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    if len(generator) != len(z):
        raise ValueError(f"{len(generator)} generators for a batch of {len(z)}")
    return torch.cat([torch.randn((1, *z.shape[1:]), generator=g, dtype=z.dtype) for g in generator]).to(z.device)


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


def guided_stacked(eps_model: EpsModel, scale: float) -> EpsModel:
    """Classifier-free guidance in one model call: the batch is stacked [z; z] with conditions [c; u] (tensors
    concatenated on the batch axis, so several branches of one batch are guided together), then split."""

    def eps(z: torch.Tensor, t: int, condition: tuple) -> torch.Tensor:
        conditional, unconditional = condition
        if scale == 1.0:
            return eps_model(z, t, conditional)
        both = eps_model(torch.cat([z, z]), t, torch.cat([conditional, unconditional]))
        e_c, e_u = both.chunk(2)
        return e_u + scale * (e_c - e_u)

    return eps


def make_scheduler(name: str, like) -> object:
    """A diffusers scheduler chosen by class name (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    ...) with the noise schedule of `like` (a backbone's scheduler), so any sampler works on any backbone."""
    return scheduler_class(name).from_config(like.config)


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class of that name; a clear error listing the known ones otherwise."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"unknown scheduler {name!r}; diffusers has: {', '.join(known)}")
    return cls


def sample_with(scheduler, eps_model: EpsModel, z_T: torch.Tensor, steps: int, condition: object = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampling with any diffusers scheduler's own step (its input scaling and initial noise sigma included).
    `eps_model` gives noise, as everywhere here, so the scheduler is told so (`prediction_type` epsilon)."""
    import inspect

    if predicts_velocity(scheduler):
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    # only stochastic schedulers take a generator (PNDM's, UniPC's, Heun's step have no such argument)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    z = z_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = eps_model(scheduler.scale_model_input(z, t), int(t), condition)
        z = scheduler.step(eps, t, z, **extra).prev_sample
    return z
