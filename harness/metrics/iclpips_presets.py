"""The IC-LPIPS settings (harness.metrics.iclpips) and the named presets that reproduce each paper's code. Torch-free,
so that suites and the command line list the presets without loading the networks."""
from __future__ import annotations

from dataclasses import dataclass

from harness.registry import Registry


@dataclass(frozen=True)
class ICLPIPSConfig:
    net: str = "vgg"
    size: int | None = 256  # None: keep the generated images' size (DFMGAN); centres are resized to it
    cluster_cap: int = 50
    selection: str = "random"  # random (seeded) | first (generation order)
    seed: int = 0
    small_clusters: str = "skip"  # skip | zero
    centre_range: str = "[-1,1]"  # [-1,1] | 0..255: centres enter LPIPS unscaled (DFMGAN's code; see PRESETS)

    def __post_init__(self):
        if self.selection not in ("random", "first"):
            raise ValueError(f"IC-LPIPS selection must be 'random' or 'first', not {self.selection!r}")
        if self.small_clusters not in ("skip", "zero"):
            raise ValueError(f"IC-LPIPS small_clusters must be 'skip' or 'zero', not {self.small_clusters!r}")
        if self.centre_range not in CENTRE_RANGES:
            raise ValueError(f"IC-LPIPS centre_range must be one of {CENTRE_RANGES}, not {self.centre_range!r}")


CENTRE_RANGES = ("[-1,1]", "0..255")
PRESETS: Registry[ICLPIPSConfig] = Registry("IC-LPIPS preset", ICLPIPSConfig)
for _name, _config in {
    # DualAnoDiff's eval/compute-ic-lpipis.py: VGG, 256 px, both sets in [-1, 1], 50 per cluster (shuffled without a
    # seed there, seeded here)
    "ic_lpips": ICLPIPSConfig(),
    # DFMGAN's metrics/lpips.py, bug included: AlexNet, no resize, up to 200 per cluster in generation order, small
    # clusters count 0, and the real centres enter LPIPS as 0..255 (uint8, never scaled) while the generated images
    # are in [-1, 1], so the nearest-centre assignment compares images of different ranges
    "ic_lpips_dfmgan": ICLPIPSConfig(net="alex", size=None, cluster_cap=200, selection="first", small_clusters="zero",
                                     centre_range="0..255"),
    # the same with the centres scaled to [-1, 1] like the generated images: what DFMGAN meant to compute
    "ic_lpips_dfmgan_fixed": ICLPIPSConfig(net="alex", size=None, cluster_cap=200, selection="first",
                                           small_clusters="zero"),
    # DualAnoDiff's rule with AlexNet at the images' own size: no paper's protocol, a cheap one for smoke runs
    # (a smoke-suite score job: 4 s against 24 s with VGG at 256 px, on 2 CPU cores)
    "ic_lpips_alex": ICLPIPSConfig(net="alex", size=None),
}.items():
    PRESETS.add(_name, _config)
