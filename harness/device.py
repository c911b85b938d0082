"""The device computations run on: a GPU when there is one, else the CPU ($DEFECTBENCH_DEVICE overrides)."""
from __future__ import annotations

import functools
import os

import torch


def default_device() -> torch.device:
    forced = os.environ.get("DEFECTBENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


AUTOCAST_TYPES = ("auto", "float32")  # auto: bf16 where computed natively; no float16: it needs a gradient scaler


@functools.lru_cache(maxsize=None)
def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 natively, so that bf16 autocast is faster than float32: AVX-512 BF16 or AMX
    on x86 (ARM: its BF16 extension), and the kernels torch dispatches to may use them
    (`torch.backends.cpu.get_cpu_capability()` is not capped below AVX-512, e.g. by ATEN_CPU_CAPABILITY, and oneDNN
    has bf16). Without them bf16 is emulated: 18x slower than float32 on an AVX2-only CPU, 2x on AVX-512 without
    BF16 (measured)."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch 2.9+; older ones: assume none, run float32
    capabilities = get() if get is not None else {}
    if capabilities.get("architecture") in ("aarch64", "arm64"):
        return bool(capabilities.get("bf16") or capabilities.get("sve_bf16"))
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    return bool(native and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_type(device: torch.device, name: str) -> str:
    """The type a forward pass set to `name` runs in on `device`: "auto" is bf16 where the device computes it
    natively (a CUDA GPU that supports it; a CPU with bf16 instructions) and float32 elsewhere, never an emulated
    bf16; "float32" is float32."""
    if name not in AUTOCAST_TYPES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_TYPES)}, not {name!r}")
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_computes_bf16()
        return "bfloat16" if native else "float32"
    return name


def autocast(device: torch.device, name: str) -> torch.autocast:
    """A forward pass in mixed precision: the ops autocast covers run in `autocast_type(device, name)` ("float32":
    none). Weights, optimiser and losses stay in float32 (compute the loss on a float32 copy of the output)."""
    effective = autocast_type(device, name)
    return torch.autocast(device.type, dtype=getattr(torch, effective), enabled=effective != "float32")
