"""The device computations run on: a GPU when there is one, else the CPU ($DEFECTBENCH_DEVICE overrides)."""
from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    forced = os.environ.get("DEFECTBENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


AUTOCAST_TYPES = ("float32", "bfloat16")  # no float16: it would need a gradient scaler


def autocast(device: torch.device, name: str) -> torch.autocast:
    """A forward pass in mixed precision: the ops autocast covers run in `name` ("float32": none). Weights,
    optimiser and losses stay in float32 (compute the loss on a float32 copy of the output)."""
    if name not in AUTOCAST_TYPES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_TYPES)}, not {name!r}")
    return torch.autocast(device.type, dtype=getattr(torch, name), enabled=name != "float32")
