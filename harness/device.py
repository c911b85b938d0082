"""The device computations run on: a GPU when there is one, else the CPU ($DEFECTBENCH_DEVICE overrides)."""
from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    forced = os.environ.get("DEFECTBENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
