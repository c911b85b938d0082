"""Weights resolution with the network unreachable: no hang, no crash, a recorded and warned fallback."""
from __future__ import annotations

import socket
import time
import warnings

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
