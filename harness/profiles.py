"""Profiles: `tiny` (the embedded default, CPU, no network) and `paper` (the papers' models and settings)."""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    name: str
    resolution: int  # every image is resized to resolution x resolution at load time
    allow_random_weights: bool  # may a missing pretrained network fall back to random weights?
    description: str
    gpu_share: float = 1.0  # the share of one GPU a job that uses networks asks for, where the cluster has GPUs


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        resolution=128,
        allow_random_weights=True,
        description="small networks built from configs and trained here; runs on a CPU with no network",
        gpu_share=0.125,  # the tiny networks are small: eight jobs share a GPU
    ),
    "paper": Profile(
        name="paper",
        resolution=256,
        allow_random_weights=False,
        description="the papers' pretrained models and settings; needs the weights (GPU recommended)",
    ),
}

DEFAULT_PROFILE = "tiny"


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
