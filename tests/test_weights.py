"""Weights resolution with the network unreachable: no hang, no crash, a recorded and warned fallback."""
from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from harness import weights
from harness.errors import WeightsError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, an empty torch cache, and a fresh process-level state in harness.weights."""
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_reachable", {})
    monkeypatch.setattr(weights, "_warned", set())
    return tmp_path


def test_tiny_falls_back_to_random_and_warns_once(offline):
    start = time.perf_counter()
    with pytest.warns(weights.RandomWeightsWarning, match="inception-v3-fid") as caught:
        first = weights.resolve("inception-v3-fid", "tiny")
        second = weights.resolve("inception-v3-fid", "tiny")
    assert time.perf_counter() - start < 10
    assert len([w for w in caught if issubclass(w.category, weights.RandomWeightsWarning)]) == 1
    assert first.is_random and second.is_random
    assert first.describe() == "random(seed=0)" and first.as_record()["random"] is True


def test_paper_profile_forbids_random_weights(offline):
    with pytest.raises(WeightsError) as info:
        weights.resolve("vgg16", "paper")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "paper" in message and str(weights.cache_dir()) in message


def _publish(monkeypatch, name: str, path) -> None:
    """Pretend the file at `path` is the published one of `name` (its SHA-256 becomes the published hash)."""
    import dataclasses

    from harness.io import sha256_file

    monkeypatch.setitem(weights.KNOWN, name, dataclasses.replace(weights.KNOWN[name], sha256=sha256_file(path)))


def test_explicit_path_and_cache(offline, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        weights.resolve("alexnet", "tiny", explicit=offline / "missing.pth")
    explicit = offline / "mine.pth"
    torch.save({}, explicit)
    assert weights.resolve("alexnet", "paper", explicit=explicit).source == "config"  # another name: not checked
    cached = weights.cache_dir() / weights.KNOWN["alexnet"].filename
    cached.parent.mkdir(parents=True)
    torch.save({}, cached)
    _publish(monkeypatch, "alexnet", cached)
    resolved = weights.resolve("alexnet", "paper")
    assert resolved.source == "cache" and resolved.path == cached


def test_a_file_under_a_published_name_must_be_the_published_file(offline):
    """A damaged or crafted alexnet-owt-7be5be79.pth in the torch cache is refused before it is loaded."""
    cached = weights.cache_dir() / weights.KNOWN["alexnet"].filename
    cached.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, cached)
    with pytest.raises(WeightsError) as info:
        weights.resolve("alexnet", "tiny")
    assert str(cached) in str(info.value) and "SHA-256" in str(info.value)
    explicit = offline / weights.KNOWN["vgg16"].filename  # the published name given explicitly: checked as well
    torch.save({}, explicit)
    with pytest.raises(WeightsError, match="SHA-256"):
        weights.resolve("vgg16", "tiny", explicit=explicit)


class _Payload:
    """Unpickling this runs code (writes a marker file): what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_cannot_run_code_when_loaded(offline, monkeypatch):
    from harness.metrics.lpips_net import LPIPSNet

    marker = offline / "code-ran"
    cached = weights.cache_dir() / weights.KNOWN["alexnet"].filename
    cached.parent.mkdir(parents=True)
    torch.save({"features.0.weight": _Payload(marker)}, cached)
    _publish(monkeypatch, "alexnet", cached)  # even with a matching hash (a poisoned cache and list)
    with pytest.raises(WeightsError, match="cannot load weights"):
        LPIPSNet("alex", "paper")
    assert not marker.exists()
    with pytest.raises(WeightsError):
        weights.load_file(cached)
    assert not marker.exists()


def test_download_when_online(offline, monkeypatch):
    monkeypatch.setattr(weights, "is_reachable", lambda url: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix, progress: torch.save({"ok": 1}, dst))
    with pytest.raises(WeightsError, match="SHA-256"):  # the fake download is not the published file
        weights.resolve("resnet34", "paper")
    _publish(monkeypatch, "resnet34", weights.cache_dir() / weights.KNOWN["resnet34"].filename)
    resolved = weights.resolve("resnet34", "paper")
    assert resolved.source in ("download", "cache") and resolved.path.is_file()


def test_published_hashes_carry_the_file_name_tag():
    for spec in weights.KNOWN.values():
        if spec.sha256 is None:  # nothing published (U2-Net): no download either, the file is the user's
            assert spec.url is None, spec.name
            continue
        tag = spec.filename.rsplit("-", 1)[1].split(".")[0]
        assert len(spec.sha256) == 64 and spec.sha256.startswith(tag), spec.name


def test_networks_build_offline_and_record_it(offline):
    from harness.metrics.fidelity import InceptionFeatures
    from harness.metrics.lpips_net import LPIPSNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        inception, vgg = InceptionFeatures("tiny"), LPIPSNet("vgg", "tiny")
        assert time.perf_counter() - start < 60
    assert inception.provenance()["random"] and vgg.provenance()["random"]
    with pytest.raises(WeightsError):
        LPIPSNet("vgg", "paper")
    with pytest.raises(WeightsError):
        InceptionFeatures("paper")


def test_random_weights_are_reproducible(offline):
    from harness.metrics.lpips_net import LPIPSNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = LPIPSNet("alex"), LPIPSNet("alex")
    for p, q in zip(a.model.net.parameters(), b.model.net.parameters()):
        assert torch.equal(p, q)


def test_lpips_trunk_loads_torchvision_weights(offline):
    """Real ImageNet weights are copied into lpips' trunk slices (checked with a saved torchvision state dict)."""
    from harness.metrics.lpips_net import LPIPSNet

    reference = torchvision.models.alexnet(weights=None)
    path = offline / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    net = LPIPSNet("alex", "paper", trunk_weights=path)
    assert net.trunk.source == "config"
    assert torch.equal(net.model.net.slice1[0].weight.cpu(), reference.features[0].weight)
    assert torch.equal(getattr(net.model.net.slice5, "10").weight.cpu(), reference.features[10].weight)


def test_a_network_without_published_weights_is_found_only_where_the_user_put_it(offline):
    assert weights.find("u2net") is None  # no download, no random fallback
    path = weights.cache_dir() / "u2net.pth"
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, path)
    found = weights.find("u2net")
    assert found.source == "cache" and found.identity().startswith("sha256:")  # its own content hash


# ---- diffusion backbones from the hub: what is downloaded, and the job keys ------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5's public file listing (the hub's "Files" tab)
SD15_LISTING = """
.gitattributes README.md model_index.json v1-inference.yaml
v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors v1-5-pruned.ckpt v1-5-pruned.safetensors
feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.fp16.safetensors safety_checker/model.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.fp16.safetensors text_encoder/model.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.non_ema.bin
unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.safetensors
vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors
""".split()
SD15_READ = ["scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
# CompVis/ldm-text2im-large-256's (LDM text2img-large: AnomalyDiffusion's backbone)
LDM_LISTING = """
.gitattributes README.md model_index.json
bert/config.json bert/pytorch_model.bin
scheduler/scheduler_config.json
tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.txt
unet/config.json unet/diffusion_pytorch_model.bin
vqvae/config.json vqvae/diffusion_pytorch_model.bin
""".split()
LDM_READ = ["bert/config.json", "bert/pytorch_model.bin", "scheduler/scheduler_config.json",
            "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.txt",
            "unet/config.json", "unet/diffusion_pytorch_model.bin", "vqvae/config.json",
            "vqvae/diffusion_pytorch_model.bin"]


def test_the_download_takes_only_the_files_the_loader_reads():
    """Not the fp16 or non-EMA variants, the pickled copies, the single-file checkpoints or the safety checker:
    11 of SD 1.5's 36 files (about 4.3 GB instead of about 44 GB)."""
    assert weights.loader_files(SD15_LISTING) == SD15_READ
    assert weights.loader_files(LDM_LISTING) == LDM_READ  # no safetensors there: the pickled weights
    assert weights.missing_parts(SD15_READ) == [] and weights.missing_parts(LDM_READ) == []
    assert weights.missing_parts([f for f in SD15_READ if not f.startswith("unet/")]) == ["unet/"]
    assert weights.missing_parts(["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]) == [
        "vae/ or vqvae/", "text_encoder/ or bert/", "tokenizer/", "scheduler/"]


def _git_blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _into_hub_cache(source: Path, cache: Path, repo_id: str, files: list[str], listing: list[str],
                    revision: str = "f" * 40) -> Path:
    """`files` of `source` laid out as huggingface_hub's cache holds a download: blobs named by their SHA-256
    (large, LFS files) or their git blob id (the others), linked from snapshots/<revision>/, refs/main, and the
    repository's `listing` in trees/<revision>.json."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name in files:
        data = (source / name).read_bytes()
        large = name.endswith((".safetensors", ".bin"))
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if large else _git_blob_sha1(data))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    # huggingface_hub >= 2.4 also keeps the commit's whole listing; its offline snapshot_download then calls a
    # snapshot that lacks any listed file (the fp16 and .bin variants not downloaded) incomplete
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{revision}.json").write_text(json.dumps({"format_version": 1, "files": {
        name: {"size": 1, "blob_id": "0" * 40} for name in listing}}))
    return snapshot


@pytest.fixture
def hub(monkeypatch, tmp_path, sd15_rehearsal):
    """A Hugging Face hub that serves the SD 1.5 rehearsal model under SD 1.5's listing, into an empty cache; the
    calls that download are recorded."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    real = huggingface_hub.snapshot_download
    downloads = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, cache_dir=str(cache), **kwargs)
        downloads.append(sorted(allow_patterns))
        served = set(weights.loader_files(SD15_LISTING)) & set(allow_patterns)
        return str(_into_hub_cache(sd15_rehearsal, cache, repo_id, sorted(served & set(weights._listing(sd15_rehearsal))),
                                   SD15_LISTING))

    class Api:
        def list_repo_files(self, repo_id, **kwargs):
            return list(SD15_LISTING)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(weights, "is_reachable", lambda url: True)
    return downloads


def test_resolve_pipeline_downloads_those_files_and_then_finds_them_in_the_cache(hub, monkeypatch):
    first = weights.resolve_pipeline("stable-diffusion-v1-5")
    assert first.source == "download" and hub == [SD15_READ]
    monkeypatch.setattr(weights, "is_reachable", lambda url: False)  # offline: the cache alone
    second = weights.resolve_pipeline("stable-diffusion-v1-5")
    assert second.source == "cache" and len(hub) == 1 and second.path == first.path
    from harness.diffusion.backbone import load

    assert type(load(second.path).unet).__name__ == "UNet2DConditionModel"  # the loader finds what it reads


def _paper_backbone_key(tmp_path: Path, folder: Path | None = None) -> tuple[str, str]:
    """The backbone job's key and provenance of a paper-profile suite with background_aware (SD 1.5) on synthetic
    data: the fits' keys follow it (it is their dependency)."""
    from harness.runner.kinds import KINDS
    from harness.runner.plan import prepare
    from harness.runner.suite import parse_suite
    from tests.test_runner import mini

    suite = parse_suite(mini(profile="paper", methods=["background_aware"],
                             weights={"stable-diffusion-v1-5": str(folder)} if folder else {}), tmp_path / "s.yaml")
    jobs = KINDS["backbone"].expand(prepare(suite))
    return jobs[0].key, jobs[0].tags["backbone"]


def test_the_backbone_key_follows_the_weights_content_not_where_they_were_found(hub, tmp_path):
    """The run that downloads SD 1.5 and every run after it (found in the cache), and a folder of one's own with the
    same files, plan the same keys; a changed weight changes them. A dry run downloads nothing."""
    import shutil

    with weights.no_downloads() as pending:
        dry_key, dry_provenance = _paper_backbone_key(tmp_path)
    assert hub == [] and pending == ["stable-diffusion-v1-5: https://huggingface.co/stable-diffusion-v1-5/"
                                     "stable-diffusion-v1-5 (the files its loader reads)"]
    assert dry_provenance == "stable-diffusion-v1-5:pending:stable-diffusion-v1-5"
    downloaded = _paper_backbone_key(tmp_path)
    assert len(hub) == 1
    cached = _paper_backbone_key(tmp_path)
    assert len(hub) == 1 and cached == downloaded
    own = tmp_path / "own"
    shutil.copytree(weights.resolve_pipeline("stable-diffusion-v1-5").path, own)  # the links' files, copied
    assert _paper_backbone_key(tmp_path, own) == downloaded  # plain files, hashed: the same content
    assert downloaded[1].startswith("stable-diffusion-v1-5:sha256:") and dry_key != downloaded[0]
    scheduler = own / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("0.012", "0.0125"))
    assert _paper_backbone_key(tmp_path, own)[0] != downloaded[0]


def test_a_dry_run_downloads_no_other_weights(offline, monkeypatch):
    """Inception, LPIPS' trunk, the downstream networks: a dry run lists what it would download and resolves it as
    pending, with the identity the download would have (its published hash, which the download is checked against)."""
    monkeypatch.setattr(weights, "is_reachable", lambda url: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded in a dry run"))
    with weights.no_downloads() as pending:
        resolved = weights.resolve("inception-v3-fid", "paper")
    assert resolved.source == "pending" and pending == [f"inception-v3-fid: {weights.KNOWN['inception-v3-fid'].url}"]
    assert resolved.identity() == "sha256:" + weights.KNOWN["inception-v3-fid"].sha256[:16]
