"""LoRA adapters through peft: on a UNet's attention projections and on a text encoder, trained alone and saved
alone (an adapter checkpoint is kilobytes to megabytes where a full Stable Diffusion UNet is 3.4 GB).

`add_lora` injects a named adapter (peft's `inject_adapter_in_model`, B initialised to zero so the model is
unchanged until trained) and freezes everything else; `save_lora` writes the adapter's tensors and settings;
`load_lora` injects the same adapter into a fresh model and fills it. Several named adapters can live in one model
(peft switches between them); for different adapters on different samples of one training batch, see
harness.diffusion.attention's per-branch LoRA processor.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers Attention: self- and cross-attention
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # transformers CLIP attention
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float | None = None  # None: equal to the rank (scaling 1)
    targets: tuple[str, ...] = UNET_TARGETS
    dropout: float = 0.0

    @classmethod
    def from_config(cls, entry: dict | None, targets: tuple[str, ...] | None = None) -> "LoraSettings | None":
        """A method config's LoRA entry ({rank, alpha?, targets?}; null: no LoRA) as settings; `targets` when the
        entry names none."""
        if not entry:
            return None
        return cls(rank=int(entry["rank"]), alpha=entry.get("alpha"),
                   targets=tuple(entry.get("targets") or targets or UNET_TARGETS))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=list(self.targets),
                          lora_dropout=self.dropout, init_lora_weights=True)


def add_lora(model: torch.nn.Module, settings: LoraSettings, name: str = "default",
             seed: int | None = None) -> list[torch.nn.Parameter]:
    """Inject adapter `name` and make it the only trainable part of `model`; returns its parameters. `seed` draws
    the adapter's random starting weights (peft's A) from its own stream; None: from the global generator, which the
    caller then seeds (otherwise a fit depends on what its process ran before)."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(settings.peft_config(), model, adapter_name=name)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"no layer of {type(model).__name__} matches the LoRA targets {settings.targets}")
    for param in params:
        param.requires_grad_(True)
    return params


def lora_state(model: torch.nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def save_lora(model: torch.nn.Module, folder: Path, settings: LoraSettings, name: str = "default") -> Path:
    """The adapter's tensors (safetensors) and settings (JSON) in `folder`, nothing of the base model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state(model, name).items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**asdict(settings), "targets": list(settings.targets)}, indent=2))
    return folder


def load_lora(model: torch.nn.Module, folder: Path, name: str = "default") -> LoraSettings:
    """Inject the adapter saved in `folder` into `model` (a fresh copy of the base it was trained on) and fill it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    settings = LoraSettings(**{**raw, "targets": tuple(raw["targets"])})
    add_lora(model, settings, name)
    result = set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS_FILE)), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: tensors that fit no adapter layer: {unexpected[:3]}")
    model.requires_grad_(False)
    return settings
