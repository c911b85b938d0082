"""LPIPS (Zhang et al., CVPR 2018) as one feature vector per image and distances between vectors.

The lpips package computes d(x, y) = sum_l mean_hw sum_c w_lc (f_l(x) - f_l(y))^2 with unit-normalised trunk
features f_l and non-negative learned heads w_l. Scaling each layer's features by sqrt(w_lc / (H_l W_l)) and
concatenating the layers turns this into a squared Euclidean distance, d(x, y) = |F(x) - F(y)|^2. So features
are computed once per image, and all pairwise distances of two sets come from one matrix product
(|a|^2 + |b|^2 - 2 a.b), instead of one network pass per pair.

Weights: the linear heads ship inside the lpips package; the trunk (VGG-16 or AlexNet) is resolved by
`harness.weights` and is random (seeded) where no ImageNet weights are found and the profile allows it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness import weights
from harness.data.images import read_image
from harness.device import default_device
from harness.profiles import Profile

TRUNK_WEIGHTS = {"vgg": "vgg16", "alex": "alexnet"}
GEMM_CHUNK = 1 << 14  # columns per float32 product; partial products are summed in float64 (error ~1e-8)


def load_lpips_image(path: Path, size: int | None, value_range: str = "[-1,1]") -> torch.Tensor:
    """(3, H, W) in [-1, 1]: RGB, resized with PIL bilinear to size x size (torchvision Resize on a PIL image),
    as the published IC-LPIPS code does; size None keeps the file's size. value_range "0..255" leaves the
    values unscaled (DFMGAN's centres)."""
    return load_lpips_array(np.asarray(Image.open(path).convert("RGB")), size, value_range)


def load_lpips_array(image: np.ndarray, size: int | None, value_range: str = "[-1,1]") -> torch.Tensor:
    """The same as load_lpips_image for an in-memory uint8 (H, W, 3) array."""
    pil = Image.fromarray(image)
    if size is not None and pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    values = np.asarray(pil, dtype=np.float32)
    return torch.from_numpy(values if value_range == "0..255" else values / 127.5 - 1.0).permute(2, 0, 1)


class LPIPSNet:
    """An lpips.LPIPS model with its trunk weights resolved by harness.weights."""

    def __init__(self, net: str = "vgg", profile: str | Profile = "tiny", trunk_weights: str | Path | None = None,
                 device: torch.device | None = None):
        import lpips  # imported here: it loads torchvision models at import

        if net not in TRUNK_WEIGHTS:
            raise ValueError(f"LPIPS net must be one of {sorted(TRUNK_WEIGHTS)}, not {net!r}")
        self.net = net
        self.device = device or default_device()
        self.trunk = weights.resolve(TRUNK_WEIGHTS[net], profile, trunk_weights)
        with weights.seeded():
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if not self.trunk.is_random:
            _load_trunk(model, weights.load_state_dict(self.trunk))
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.heads = [lin.model[-1].weight.detach().flatten().to(self.device) for lin in model.lins]
        if any((h < 0).any() for h in self.heads):
            raise ValueError("LPIPS heads with negative weights cannot be turned into a Euclidean distance")
        self.layer_shapes: dict[tuple[int, int], list[tuple[int, int, int]]] = {}

    def provenance(self) -> dict:
        return {"lpips_net": self.net, "lpips_trunk": self.trunk.describe(), "lpips_heads": f"lpips v0.1 {self.net}",
                "random": self.trunk.is_random}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) float32: each layer's unit-normalised features times sqrt(w / (H W)), concatenated."""
        import lpips

        outputs = self.model.net.forward(self.model.scaling_layer(images.to(self.device)))
        self.layer_shapes[tuple(images.shape[2:])] = [tuple(o.shape[1:]) for o in outputs]
        scaled = [(lpips.normalize_tensor(o) * (w / (o.shape[2] * o.shape[3])).sqrt()[None, :, None, None]).flatten(1)
                  for o, w in zip(outputs, self.heads)]
        return torch.cat(scaled, dim=1)

    def batched_features(self, tensors: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
        return torch.cat([self.features(torch.stack(list(tensors[i:i + batch_size])))
                          for i in range(0, len(tensors), batch_size)])

    @torch.no_grad()
    def distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(len a, len b) float64 LPIPS distances, |a|^2 + |b|^2 - 2 a.b with float64-accumulated products."""
        cross = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
        a2 = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        b2 = torch.zeros(b.shape[0], dtype=torch.float64, device=a.device)
        for start in range(0, a.shape[1], GEMM_CHUNK):
            ac, bc = a[:, start:start + GEMM_CHUNK], b[:, start:start + GEMM_CHUNK]
            cross += (ac @ bc.T).double()
            a2 += (ac * ac).sum(1).double()
            b2 += (bc * bc).sum(1).double()
        return (a2[:, None] + b2[None, :] - 2.0 * cross).clamp_min(0.0)

    @torch.no_grad()
    def spatial_map(self, a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel LPIPS (N, H, W) between matching rows, as lpips' spatial=True computes it: each layer's
        weighted squared difference upsampled bilinearly to `size`, summed over layers."""
        total = torch.zeros(a.shape[0], 1, *size, device=a.device)
        start = 0
        for c, h, w in self.layer_shapes[tuple(size)]:
            end = start + c * h * w
            diff = (a[:, start:end] - b[:, start:end]).view(-1, c, h, w)
            layer = (diff * diff).sum(1, keepdim=True) * (h * w)  # undo the 1/(H W) of the scaling
            total += F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
            start = end
        return total[:, 0]


def _load_trunk(model, state: dict) -> None:
    """Copy torchvision ImageNet weights (features.<i>.weight) into lpips' trunk slices (slice<k>.<i>.weight)."""
    for slice_module in (m for name, m in model.net.named_children() if name.startswith("slice")):
        for index, layer in slice_module.named_children():
            params = {k.split(".")[-1]: v for k, v in state.items() if k.startswith(f"features.{index}.")}
            if params:
                layer.load_state_dict(params)


def image_size_for(path: Path) -> int:
    """The side of a (square) generated image; used by the `size: None` (DFMGAN) variant."""
    return read_image(path).shape[0]
