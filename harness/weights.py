"""Where pretrained weights come from, and a record of what was used.

Resolution order for a named network: an explicit path from the config, the standard cache (torch hub's
`$TORCH_HOME/hub/checkpoints`), a download when the host is reachable, and, only where the profile allows
it, a seeded random initialisation. The fallback is warned about once per process and recorded in every
result as `random(seed=...)`; where the profile forbids it, a WeightsError says where to put the file.
Nothing here blocks for long without a network: reachability is checked with a short socket timeout.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from harness.errors import WeightsError
from harness.io import cached_file_hash, sha256_json
from harness.profiles import Profile, get_profile

log = logging.getLogger(__name__)

RANDOM_SEED = 0
CONNECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str
    url: str | None  # None: no direct download (the user puts the file in the cache or names it in the config)
    description: str
    sha256: str | None  # the published SHA-256 (its first 8 hex digits are the tag in the file name); None: none is
    #                     published, so the file is identified by its own content hash


# Networks whose weights the metrics and downstream models use. File names are the ones torch hub caches.
KNOWN: dict[str, WeightSpec] = {s.name: s for s in (
    WeightSpec("inception-v3-fid", "weights-inception-2015-12-05-6726825d.pth",
               "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
               "Inception-v3 of the TF FID code (torch-fidelity), for IS / FID / KID",
               "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),
    WeightSpec("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
               "torchvision VGG-16 ImageNet weights, the trunk of LPIPS (vgg)",
               "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"),
    WeightSpec("alexnet", "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
               "torchvision AlexNet ImageNet weights, the trunk of LPIPS (alex)",
               "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"),
    WeightSpec("resnet18", "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
               "torchvision ResNet-18 ImageNet weights",
               "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    WeightSpec("resnet34", "resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth",
               "torchvision ResNet-34 ImageNet weights (defect classifier)",
               "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
    WeightSpec("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth",
               "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
               "torchvision Wide-ResNet-50-2 ImageNet weights (anomalib backbones)",
               "95faca4d11227dddf8633dbb5ff6c8a9003c1aa5b8945c73834b8007b10950b8"),
    WeightSpec("clip-vit-b-32", "ViT-B-32-40d36571.pt",  # OpenAI's ViT-B-32.pt, renamed with its hash's tag as the rest
               "https://openaipublic.azureedge.net/clip/models/"
               "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
               "OpenAI CLIP ViT-B/32 (read by open-clip), AnomalyXFusion's caption and image features",
               "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    WeightSpec("u2net", "u2net.pth", None,
               "U2-Net (xuebinqin/U-2-Net, 173.6 MB, released on Google Drive only), DualAnoDiff's part segmenter",
               None),
)}


@dataclass(frozen=True)
class ResolvedWeights:
    """What a network was built with: `source` is config | cache | download | random, or pending (a download that a
    dry run did not make; see no_downloads)."""

    name: str
    source: str
    path: Path | None
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def describe(self) -> str:
        if self.is_random:
            return f"random(seed={self.seed})"
        return f"{self.source}:{self.path.name if self.path else '?'}"

    def identity(self) -> str:
        """What the weights are, whatever their location or how they got there: the published file's hash (checked
        when resolved; also for a pending download, which is checked against it), a configured file's content hash,
        a diffusers folder's (pipeline_identity: the files its loader reads), or the random seed. Part of job keys."""
        if self.is_random:
            return f"random(seed={self.seed})"
        spec = KNOWN.get(self.name)
        if spec is not None and spec.sha256 and (self.source == "pending" or
                                                 (self.path is not None and self.path.name == spec.filename)):
            return f"sha256:{spec.sha256[:16]}"
        if self.path is not None and self.path.is_file():
            return f"sha256:{cached_file_hash(self.path)[:16]}"
        if self.path is not None and self.path.is_dir():
            return f"sha256:{pipeline_identity(self.path)}"
        return f"{self.source}:{self.name}"  # a pending pipeline: its content is known once it is downloaded

    def as_record(self) -> dict:
        return {"name": self.name, "source": self.source, "path": str(self.path) if self.path else None,
                "seed": self.seed, "random": self.is_random}


_warned: set[str] = set()
_reachable: dict[str, bool] = {}
_pending: list[str] | None = None  # while no_downloads is active: what a run would download


@contextlib.contextmanager
def no_downloads() -> Iterator[list[str]]:
    """Resolve without downloading anything (a dry run): what would be downloaded resolves as `pending`, with the
    identity the download would have where that is known in advance (a published hash), and is listed in the
    yielded list."""
    global _pending
    outer, _pending = _pending, []
    try:
        yield _pending
    finally:
        _pending = outer


def _hold(what: str) -> bool:
    """Whether downloads are held back (no_downloads); notes `what` would have been downloaded."""
    if _pending is None:
        return False
    if what not in _pending:
        _pending.append(what)
    return True


def cache_dir() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_reachable(url: str) -> bool:
    """Can a TCP connection to the URL's host be opened within a few seconds? (cached per host)"""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    if os.environ.get("DEFECTBENCH_OFFLINE") == "1":
        return False
    if host not in _reachable:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
                _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def find(name: str, explicit: str | Path | None = None) -> ResolvedWeights | None:
    """The weights of a known network from the config, the cache or a download; None where there are none (for
    networks with no sensible random fallback, whose callers use a recorded stand-in instead)."""
    spec = KNOWN.get(name)
    if spec is None:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(KNOWN)}")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights for {name!r}: the configured file {path} does not exist")
        if path.name == spec.filename:  # the published file under its own name: it must be that file
            verify(spec, path)
        return ResolvedWeights(name, "config", path)
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return ResolvedWeights(name, "cache", verify(spec, cached))
    downloaded = _download(spec, cached)
    if isinstance(downloaded, ResolvedWeights):  # held back by no_downloads
        return downloaded
    if downloaded is not None:
        return ResolvedWeights(name, "download", verify(spec, downloaded))
    return None


def resolve(name: str, profile: str | Profile, explicit: str | Path | None = None) -> ResolvedWeights:
    """Find the weights of a known network, or fall back to random weights where the profile allows."""
    found = find(name, explicit)
    if found is not None:
        return found
    spec, profile = KNOWN[name], get_profile(profile)
    if not profile.allow_random_weights:
        raise WeightsError(
            f"weights for {name!r} ({spec.description}) not found and cannot be downloaded; the {profile.name!r} "
            f"profile does not allow random weights. Put {spec.filename} in {cache_dir()} or set its path in the "
            f"config (weights: {{{name}: /path/to/{spec.filename}}})")
    warn_once(name, f"no pretrained weights for {name!r} ({spec.description}): using a random initialisation "
                    f"(seed {RANDOM_SEED}); results are marked as computed with random weights")
    return ResolvedWeights(name, "random", None, RANDOM_SEED)


def verify(spec: WeightSpec, path: Path) -> Path:
    """The file, if its SHA-256 is the published one; else a WeightsError naming it (a damaged download, another
    file under the published name, or a crafted checkpoint). A network with no published hash passes unchecked."""
    if spec.sha256 is None:
        return path
    digest = cached_file_hash(path)
    if digest != spec.sha256:
        raise WeightsError(f"{path}: SHA-256 {digest[:16]}... is not the published {spec.sha256[:16]}... of "
                           f"{spec.filename} ({spec.description}); delete it or replace it with the published file")
    return path


def _download(spec: WeightSpec, target: Path) -> Path | ResolvedWeights | None:
    if spec.url is None or not is_reachable(spec.url):
        return None
    if _hold(f"{spec.name}: {spec.url}"):
        return ResolvedWeights(spec.name, "pending", None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256, progress=False)
        return target
    except Exception as err:  # a failed download falls through to the next option
        log.warning("download of %s failed: %s", spec.url, err)
        return None


def warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RandomWeightsWarning, stacklevel=3)


# Diffusion backbones in diffusers' folder layout (vae/, unet/, text_encoder/, tokenizer/, scheduler/), by hub id.
PIPELINES: dict[str, str] = {
    "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "ldm-text2im-large-256": "CompVis/ldm-text2im-large-256",  # AnomalyDiffusion's: LDMBert, 256 px
}
PIPELINE_HOST = "https://huggingface.co"
# What harness/diffusion/backbone.load reads of such a folder: each network's config and one weights file, and the
# tokenizer's and scheduler's (small) files. LDM text2img-large names its autoencoder and text encoder vqvae/, bert/
PIPELINE_NETWORKS = {"vae": ("vae", "vqvae"), "unet": ("unet",), "text_encoder": ("text_encoder", "bert")}
PIPELINE_SMALL_PARTS = ("tokenizer", "scheduler")
# from_pretrained's choice: the full-precision safetensors file where there is one, else the pickled one
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def loader_files(listing: Iterable[str]) -> list[str]:
    """The files of a diffusers folder (or hub repository) that the backbone's loader reads, from its listing (paths
    relative to it): per network its config.json and the first of WEIGHT_FILES listed (never the fp16 or non-EMA
    variants, the single-file checkpoints or the safety checker), and every file of tokenizer/ and scheduler/."""
    listing = set(listing)
    chosen = []
    for part in {folder for folders in PIPELINE_NETWORKS.values() for folder in folders}:
        weights_file = next((f"{part}/{name}" for name in WEIGHT_FILES if f"{part}/{name}" in listing), None)
        if f"{part}/config.json" in listing and weights_file:
            chosen += [f"{part}/config.json", weights_file]
    chosen += [f for f in listing if f.split("/")[0] in PIPELINE_SMALL_PARTS and f.count("/") == 1]
    return sorted(chosen)


def missing_parts(files: Iterable[str]) -> list[str]:
    """What the loader needs and `files` (loader_files' answer) lack: a network, a tokenizer or a scheduler."""
    present = {f.split("/")[0] for f in files}
    missing = [" or ".join(f"{f}/" for f in folders) for folders in PIPELINE_NETWORKS.values()
               if not present & set(folders)]
    return missing + [f"{part}/" for part in PIPELINE_SMALL_PARTS if part not in present]


def _listing(folder: Path) -> list[str]:
    return [str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()]


def _content_hash(path: Path) -> str:
    """A file's SHA-256. In the Hugging Face cache a large (LFS) file is a link to a blob named by its SHA-256 (the
    hub's, as huggingface_hub names blobs by the ETag; not re-hashed here), so that name is read instead of 4 GB."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return cached_file_hash(path)


def pipeline_identity(folder: Path) -> str:
    """A diffusers folder by content: the hash of the SHA-256s of the files its loader reads (loader_files), so
    the same weights have the same identity in the hub's cache, after a download or copied to a folder of one's own."""
    files = loader_files(_listing(folder))
    return sha256_json({f: _content_hash(folder / f) for f in files})[:16]


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of a hub repository's main branch (the cache's documented layout: refs/main names the
    commit, snapshots/<commit>/ holds its files), or None. Read directly: huggingface_hub >= 2.4's offline
    snapshot_download refuses a snapshot that lacks any file of the repository's listing, and this one holds only
    the files the loader reads."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return snapshot if snapshot.is_dir() else None


def resolve_pipeline(name: str, explicit: str | Path | None = None) -> ResolvedWeights:
    """A diffusion backbone folder: the configured folder, the Hugging Face cache ($HF_HOME), or a download of the
    files its loader reads (loader_files; under no_downloads: pending).

    There is no random fallback: a randomly initialised Stable Diffusion means nothing (the `tiny` profile
    has its own, shipped backbone instead)."""
    repo_id = PIPELINES.get(name)
    if repo_id is None:
        raise WeightsError(f"unknown diffusion backbone {name!r}; known: {', '.join(PIPELINES)}")
    if explicit:
        path = Path(explicit).expanduser()
        missing = missing_parts(loader_files(_listing(path))) if path.is_dir() else ["the folder itself"]
        if missing:
            raise WeightsError(f"weights for {name!r}: {path} is not a diffusers folder (missing {', '.join(missing)}; "
                               f"each network needs its config.json and weights)")
        return ResolvedWeights(name, "config", path)
    from huggingface_hub import HfApi, snapshot_download

    cached = _cached_snapshot(repo_id)
    if cached is not None and not missing_parts(loader_files(_listing(cached))):
        return ResolvedWeights(name, "cache", cached)
    if is_reachable(PIPELINE_HOST):
        if _hold(f"{name}: {PIPELINE_HOST}/{repo_id} (the files its loader reads)"):
            return ResolvedWeights(name, "pending", None)
        try:
            files = loader_files(HfApi().list_repo_files(repo_id))
            if missing_parts(files):
                raise WeightsError(f"{repo_id} lacks {', '.join(missing_parts(files))}")
            return ResolvedWeights(name, "download", Path(snapshot_download(repo_id, allow_patterns=files)))
        except Exception as err:
            log.warning("download of %s failed: %s", repo_id, err)
    raise WeightsError(f"weights for {name!r} ({repo_id}) are not in the Hugging Face cache and cannot be downloaded. "
                       f"Download them on a machine with a network (huggingface-cli download {repo_id}) and copy the "
                       f"cache, or set the folder in the suite (weights: {{{name}: /path/to/folder}})")


class RandomWeightsWarning(UserWarning):
    """A network runs with random weights because no pretrained ones could be found."""


def load_state_dict(resolved: ResolvedWeights) -> dict:
    """The tensors of a resolved checkpoint (see load_file)."""
    if resolved.path is None:
        raise WeightsError(f"{resolved.name}: no file to load (random weights)")
    return load_file(resolved.path, resolved.name)


def load_file(path: Path, name: str | None = None) -> dict:
    """A checkpoint's tensors, loaded with weights_only=True so that a checkpoint cannot run code when loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        what = f" for {name!r}" if name else ""
        raise WeightsError(f"{path}: cannot load weights{what} ({type(err).__name__}: {str(err).splitlines()[0]})") from None


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Build a randomly initialised network reproducibly, without disturbing the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def identities(names: tuple[str, ...], profile: str | Profile, configured: dict) -> dict[str, str]:
    """Which weights jobs will use, by content (ResolvedWeights.identity; `configured`: the suite's `weights:`): part
    of their keys, so results follow the weights and not the folder they were found in."""
    return {name: resolve(name, profile, configured.get(name)).identity() for name in names}
