"""IC-LPIPS (intra-cluster LPIPS; Ojha et al., CVPR 2021), as DualAnoDiff and AnomalyDiffusion report it.

1. Cluster centres are the generator-training anomalies of the defect type.
2. Every generated image joins the centre it is nearest to by LPIPS.
3. Each cluster is sampled down to at most `cluster_cap` images. The published code shuffles without a seed;
   here the members of a cluster are taken in the order of a seeded random permutation of all generated images
   (`selection: random`), or in generation order (`selection: first`, DFMGAN's variant).
4. The mean LPIPS over the pairs i < j of a cluster is its value; clusters with fewer than two images are left
   out (`small_clusters: skip`) or count as 0 (`small_clusters: zero`, DFMGAN's "clpips").
5. IC-LPIPS is the mean over clusters. Images are resized to 256 x 256 (bilinear) and scaled to [-1, 1]
   (`ic_lpips_dfmgan` reproduces DFMGAN's code, which passes the centres unscaled, 0..255; see PRESETS).

`ic_lpips` computes LPIPS features once per image (`LPIPSNet`) and every distance from them; the features of
cluster members wait for the pairwise pass in memory, or, past a budget, in a temporary folder.
`ic_lpips_bruteforce` calls the lpips network on every pair, as the published scripts do, and is the reference
the fast version is tested against.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.metrics.iclpips_presets import PRESETS, ICLPIPSConfig
from harness.metrics.lpips_net import LPIPSNet, image_size_for, load_lpips_image


@dataclass
class ICLPIPSResult:
    value: float
    cluster_sizes: list[int]  # generated images assigned to each centre
    cluster_values: list[float | None]  # mean pairwise LPIPS of each (capped) cluster; None when left out
    assignment: np.ndarray  # index of the nearest centre, per generated image
    nearest: np.ndarray  # LPIPS to the nearest centre, per generated image
    config: ICLPIPSConfig = field(default_factory=ICLPIPSConfig)

    @property
    def clusters_used(self) -> int:
        return sum(v is not None for v in self.cluster_values)

    @property
    def lpips_to_real(self) -> float:
        """Mean LPIPS from each generated image to its nearest real training anomaly (Cho et al.'s LPIPS)."""
        return float(np.mean(self.nearest)) if len(self.nearest) else float("nan")


def member_order(n: int, selection: str, seed: int) -> np.ndarray:
    """The order in which generated images enter their clusters."""
    return np.random.default_rng(seed).permutation(n) if selection == "random" else np.arange(n)


def select_members(assignment: np.ndarray, n_centres: int, cap: int, order: np.ndarray) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(n_centres)]
    for index in order:
        cluster = members[int(assignment[index])]
        if len(cluster) < cap:
            cluster.append(int(index))
    return members


def aggregate(cluster_values: list[float | None], small_clusters: str) -> float:
    if small_clusters == "zero":
        values = [0.0 if v is None else v for v in cluster_values]
    else:
        values = [v for v in cluster_values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def mean_upper_triangle(matrix: torch.Tensor) -> float:
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return float(matrix[i, j].mean())


def _resolved_size(config: ICLPIPSConfig, generated: Sequence[Path]) -> int:
    return config.size if config.size is not None else image_size_for(generated[0])


def memory_budget_bytes() -> int:
    """Bytes of LPIPS features held in memory for the cluster pass ($DEFECTBENCH_LPIPS_MEMORY_GB, default 4)."""
    return int(float(os.environ.get("DEFECTBENCH_LPIPS_MEMORY_GB", "4")) * 2**30)


class FeatureStore:
    """Feature vectors kept for later: in memory up to a byte budget, the rest in a temporary folder."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.memory: dict[int, torch.Tensor] = {}
        self.folder: Path | None = None

    def put(self, key: int, vector: torch.Tensor) -> None:
        cost = vector.numel() * vector.element_size()
        if self.used + cost <= self.budget:
            self.memory[key], self.used = vector.clone(), self.used + cost
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="defectbench-lpips-"))
        torch.save(vector.clone().cpu(), self.folder / f"{key}.pt")

    def get(self, keys: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.memory[k] if k in self.memory else torch.load(self.folder / f"{k}.pt") for k in keys])

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ic_lpips(net: LPIPSNet, generated: Sequence[Path], centres: Sequence[Path], config: ICLPIPSConfig = ICLPIPSConfig(),
             batch_size: int = 8, on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
             progress: bool = False) -> ICLPIPSResult:
    """IC-LPIPS from one LPIPS feature pass per image.

    Generated images are streamed in member order, so an image's cluster membership is known when its features
    are computed; members keep their features (FeatureStore) for their cluster's pairwise pass.
    `on_batch(indices, features)` lets other metrics reuse each batch's features.
    """
    if not generated or not centres:
        raise ValueError("IC-LPIPS needs at least one generated image and one centre")
    size = _resolved_size(config, generated)
    centre_features = net.batched_features([load_lpips_image(p, size, config.centre_range) for p in centres], batch_size)
    n = len(generated)
    order = member_order(n, config.selection, config.seed)
    assignment, nearest = np.full(n, -1), np.full(n, np.nan)
    members: list[list[int]] = [[] for _ in centres]
    with FeatureStore(memory_budget_bytes()) as store:
        for start in tqdm(range(0, n, batch_size), desc="IC-LPIPS features", unit="batch", disable=not progress,
                          leave=False):
            batch = [int(i) for i in order[start:start + batch_size]]
            features = net.features(torch.stack([load_lpips_image(generated[i], size) for i in batch]))
            if on_batch is not None:
                on_batch(batch, features)
            distances = net.distances(features, centre_features).cpu().numpy()
            for row, index in enumerate(batch):
                k = int(np.argmin(distances[row]))
                assignment[index], nearest[index] = k, distances[row, k]
                if len(members[k]) < config.cluster_cap:
                    members[k].append(index)
                    store.put(index, features[row])
        cluster_values: list[float | None] = []
        for cluster in members:
            if len(cluster) < 2:
                cluster_values.append(None)
                continue
            features = store.get(cluster)
            cluster_values.append(mean_upper_triangle(net.distances(features, features)))
    sizes = [int((assignment == k).sum()) for k in range(len(centres))]
    return ICLPIPSResult(aggregate(cluster_values, config.small_clusters), sizes, cluster_values, assignment, nearest, config)


@torch.no_grad()
def ic_lpips_bruteforce(net: LPIPSNet, generated: Sequence[Path], centres: Sequence[Path],
                        config: ICLPIPSConfig = ICLPIPSConfig(), pair_batch: int = 8,
                        progress: bool = False) -> ICLPIPSResult:
    """The reference: the lpips network called on every (generated, centre) and (member, member) pair."""
    size = _resolved_size(config, generated)
    images = torch.stack([load_lpips_image(p, size) for p in generated])
    centre_images = torch.stack([load_lpips_image(p, size, config.centre_range) for p in centres])
    n, c = len(generated), len(centres)
    pairs = [(i, k) for i in range(n) for k in range(c)]
    to_centres = _pairwise(net, images, centre_images, pairs, pair_batch, progress, "brute force: to centres").reshape(n, c)
    assignment, nearest = to_centres.argmin(1), to_centres.min(1)
    members = select_members(assignment, c, config.cluster_cap, member_order(n, config.selection, config.seed))
    cluster_values: list[float | None] = []
    for cluster in members:
        if len(cluster) < 2:
            cluster_values.append(None)
            continue
        pairs = [(cluster[a], cluster[b]) for a in range(len(cluster)) for b in range(a + 1, len(cluster))]
        cluster_values.append(float(_pairwise(net, images, images, pairs, pair_batch, progress, "brute force: clusters").mean()))
    return ICLPIPSResult(aggregate(cluster_values, config.small_clusters), [int((assignment == k).sum()) for k in range(c)],
                         cluster_values, assignment, nearest, config)


def _pairwise(net: LPIPSNet, left: torch.Tensor, right: torch.Tensor, pairs: list[tuple[int, int]], batch: int,
              progress: bool, desc: str) -> np.ndarray:
    out = np.empty(len(pairs))
    for start in tqdm(range(0, len(pairs), batch), desc=desc, disable=not progress, leave=False):
        chunk = pairs[start:start + batch]
        a = left[[p[0] for p in chunk]].to(net.device)
        b = right[[p[1] for p in chunk]].to(net.device)
        out[start:start + len(chunk)] = net.model(a, b).flatten().double().cpu().numpy()
    return out


def preset(name: str, **overrides) -> ICLPIPSConfig:
    return replace(PRESETS[name], **overrides)
