"""Profiles: `tiny` (the embedded default, CPU, no network) and `paper` (the papers' models and settings)."""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import Registry


@dataclass(frozen=True)
class Profile:
    name: str
    resolution: int  # every image is resized to resolution x resolution at load time
    allow_random_weights: bool  # may a missing pretrained network fall back to random weights?
    description: str
    gpu_share: float = 1.0  # the share of one GPU a job that uses networks asks for, where the cluster has GPUs
    # the diffusion backbone is the shipped tiny one (fine-tuned here on normals it has not seen), for every name a
    # method gives; otherwise each name's pretrained weights are resolved (harness/weights.py)
    shipped_backbone: bool = False

    def __str__(self) -> str:
        return self.name


TINY = Profile(
    name="tiny",
    resolution=128,
    allow_random_weights=True,
    description="small networks built from configs and trained here; runs on a CPU with no network",
    gpu_share=0.125,  # the tiny networks are small: eight jobs share a GPU
    shipped_backbone=True,
)
PAPER = Profile(
    name="paper",
    resolution=256,
    allow_random_weights=False,
    description="the papers' pretrained models and settings; needs the weights (GPU recommended)",
)

PROFILES: Registry[Profile] = Registry("profile", Profile)
PROFILES.add("tiny", TINY)
PROFILES.add("paper", PAPER)

DEFAULT_PROFILE = "tiny"


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    return PROFILES[name]
