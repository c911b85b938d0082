"""methods/background_aware (Cho et al.): the equations on small tensors, and the paper's claims after fitting
on synthetic data with a pretrained tiny backbone: the background survives DDIM inversion (Proposition 1) and
the defect lands in the mask, both far better than with `init: random`."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.layouts import read_category
from harness.data.splits import make_split
from harness.generation import fit_method
from harness.methods import get_method_info, load_method
from harness.metrics.paired import mask_iou, psnr_outside
from harness.tasks import build_request, build_task


@pytest.fixture(scope="module")
def equations():
    return sys.modules[get_method_info("background_aware").cls.__module__]


def sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _mask(b=2, side=8) -> torch.Tensor:
    m = torch.zeros(b, 1, side, side)
    m[:, :, 2:5, 3:7] = 1
    return m


def test_masked_noising_and_the_disentangled_loss(equations):
    torch.manual_seed(0)
    z0, eps, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), _mask()
    alpha = torch.tensor([0.9, 0.2])
    z_t, z_t_m = equations.masked_noising(z0, m, eps, alpha)
    for i, a in enumerate(alpha):
        assert torch.allclose(z_t[i], a.sqrt() * z0[i] + (1 - a).sqrt() * eps[i])
        assert torch.allclose(z_t_m[i], a.sqrt() * (1 - m[i]) * z0[i] + (1 - a).sqrt() * (1 - m[i]) * eps[i])
    assert torch.all(z_t_m[m.expand_as(z_t_m) == 1] == 0)  # the masked latent holds nothing of the defect
    e1, e2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    direct = sum(float(((m * (eps - e1))[i] ** 2).sum()) for i in range(2)) / eps.numel() \
        + sum(float((((1 - m) * (eps - e2))[i] ** 2).sum()) for i in range(2)) / eps.numel()
    assert equations.disentangled_loss(eps, e1, e2, m).item() == pytest.approx(direct, rel=1e-6)
    # the defect term ignores the background's prediction and the background term the defect's
    e1_changed = e1 + (1 - m) * 5
    assert equations.disentangled_loss(eps, e1_changed, e2, m).item() == pytest.approx(direct, rel=1e-6)
    assert equations.naive_loss(eps, e1).item() == pytest.approx(float(((eps - e1) ** 2).mean()), rel=1e-6)


def test_masked_inversion_and_sampling_keep_the_background_path(equations):
    """Eq. 8 keeps the masked region at zero through the inversion; with Eq. 9 the two paths take the same steps
    outside the mask, so z_0* equals the background path z_0^m there exactly (Proposition 1)."""
    scheduler, m = sd_scheduler(), _mask()
    torch.manual_seed(1)
    weight = torch.randn(4, 4)

    def eps_model(z, t):  # any function of z and t stands in for the UNet
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, z) * (1 + t / 1000))

    z0 = torch.randn(2, 4, 8, 8)
    z_T_m = equations.masked_inversion(eps_model, z0, m, scheduler, 20)
    assert torch.all(z_T_m[m.expand_as(z_T_m) == 1] == 0)
    assert (z_T_m - (1 - m) * z0).abs().max() > 0.1  # it moved
    z_T = z_T_m + m * torch.randn(z0.shape)
    z0_star, z0_m = equations.background_aware_sampling(
        lambda zm, zs, t: (eps_model(zm, t), eps_model(zs, t) + 3.0), z_T, z_T_m, m, scheduler, 20)
    outside = (1 - m).expand_as(z0_star) == 1
    assert torch.equal(z0_star[outside], z0_m[outside])
    assert not torch.allclose(z0_star[~outside], z0_m[~outside])


def test_mask_refinement_equation_13(equations):
    attention = torch.zeros(1, 1, 8, 8)
    attention[0, 0, 2:4, 3:5] = 0.3  # the defect token's attention, strong on part of the mask
    attention[0, 0, 6:8, 0:2] = 0.9  # strong outside the mask: removed by the product with m'
    attention[0, 0, 4, 6] = 0.05  # weak inside the mask: below half of the peak
    refined = equations.refine_mask(attention, _mask(1), 32)
    assert refined.shape == (1, 32, 32) and refined.dtype == bool
    assert refined[0, 8:16, 12:20].mean() > 0.5  # where the attention is, upsampled x4
    assert not refined[0, 24:, :8].any() and not refined[0, 16:20, 24:28].any()


@pytest.fixture(scope="module")
def washer_task(synth_root, pretrained_backbone):
    split = make_split(read_category(synth_root, "washer", dataset="synthetic"))
    task = build_task(split, ["stain"], 64, seed=0)
    task.backbone = pretrained_backbone[0]
    return task


def _generate(task, workdir, **overrides):
    method = load_method("background_aware", "tiny", {"steps": 150, **overrides})
    request = build_request(task, method, "stain", 6, seed=3)
    samples = list(method.generate(request, workdir))
    psnr = np.mean([psnr_outside(s.image, t.normal.image, t.mask) for s, t in zip(samples, request.targets)])
    iou = np.nanmean([mask_iou(s.image, t.normal.image, s.mask) for s, t in zip(samples, request.targets)])
    return samples, request, psnr, iou


@pytest.fixture(scope="module")
def fitted(washer_task, tmp_path_factory):
    """background_aware fitted on washer/stain (64 px, 150 steps), and samples with and without inversion."""
    workdir = tmp_path_factory.mktemp("bg_aware")
    fit_method(load_method("background_aware", "tiny", {"steps": 150}), washer_task, workdir)
    return workdir, _generate(washer_task, workdir), _generate(washer_task, workdir, init="random")


def test_background_fidelity_far_better_than_random_init(washer_task, fitted):
    """Lemma 1 / Proposition 1 in practice: outside the mask the sample stays close to its target normal image
    (measured 28.5 dB against 12.7 dB with `init: random`)."""
    workdir, (samples, request, psnr, _), (_, _, psnr_random, _) = fitted
    print(f"bg_psnr {psnr:.2f} vs random {psnr_random:.2f}")
    assert psnr > psnr_random + 8.0
    for sample, target in zip(samples, request.targets):
        assert sample.image.shape == (64, 64, 3) and sample.mask.shape == (64, 64)
        assert sample.mask.any() and sample.normal_id == target.normal.id
        # the refined mask stays in the latent mask's cells (4 px) plus the bilinear upsampling's reach (one cell)
        assert not (sample.mask & ~_grown(_dilated(target.mask, 4), 4)).any()
    # the same seed gives the same images; refine_mask: false gives the target masks
    again, _, _, _ = _generate(washer_task, workdir, refine_mask=False)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again))
    assert all(np.array_equal(a.mask, t.mask) for a, t in zip(again, request.targets))


def test_mask_alignment_better_than_random_init(fitted):
    """The generated defect lands in the mask: mask_iou (the sample's refined mask against where it differs from
    its normal image) far above that of `init: random` (measured 0.103 against 0.014)."""
    _, (_, _, _, iou), (_, _, _, iou_random) = fitted
    print(f"mask_iou {iou:.3f} vs random {iou_random:.3f}")
    assert iou > 3 * iou_random


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)).astype(bool)


def _dilated(mask: np.ndarray, cell: int) -> np.ndarray:
    """The mask grown to whole latent cells (what the max-pooled latent mask covers)."""
    h, w = mask.shape
    cells = mask.reshape(h // cell, cell, w // cell, cell).any((1, 3))
    return np.kron(cells, np.ones((cell, cell), dtype=bool)).astype(bool)


def test_naive_loss_fits_and_bad_settings_are_named(washer_task, tmp_path):
    from harness.errors import MethodError

    method = load_method("background_aware", "tiny", {"steps": 3, "loss": "naive", "inference_steps": 3})
    fit_method(method, washer_task, tmp_path)
    samples = list(method.generate(build_request(washer_task, method, "stain", 2, seed=0), tmp_path))
    assert len(samples) == 2
    with pytest.raises(MethodError, match="init must be one of"):
        load_method("background_aware", "tiny", {"init": "noise"})
    with pytest.raises(MethodError, match="needs a diffusion backbone"):
        method.fit(dataclasses.replace(washer_task, backbone=None), tmp_path / "none")


def test_paper_profile_path_with_a_tiny_stand_in(washer_task, tmp_path):
    """The paper profile loads its backbone with from_pretrained and works at its own resolution (512 there; 96
    here with the tiny stand-in), returning samples at the task's resolution."""
    method = load_method("background_aware", "paper", {"steps": 2, "inference_steps": 3, "resolution": 96})
    assert method.config["learning_rate"] == 5e-6 and method.config["steps"] == 2
    fit_method(method, washer_task, tmp_path)
    samples = list(method.generate(build_request(washer_task, method, "stain", 2, seed=0), tmp_path))
    assert [s.image.shape for s in samples] == [(64, 64, 3)] * 2 and all(s.mask.shape == (64, 64) for s in samples)


# ---- in the job graph --------------------------------------------------------------------------------------------


def _suite(tmp_path, **changes):
    import yaml

    from harness.runner.suite import parse_suite

    raw = yaml.safe_load((Path(__file__).parent / "suites" / "mini.yaml").read_text())
    raw.update(methods=[{"method": "background_aware", "config": {"steps": 2, "inference_steps": 2}},
                        {"method": "background_aware", "label": "bg-aware init: random",
                         "config": {"steps": 2, "inference_steps": 2, "init": "random"}}],
               metrics=["bg_psnr", "mask_iou"], backbone={"vae_steps": 3, "unet_steps": 3})
    raw.update(changes)
    return parse_suite(raw, tmp_path / "bg.yaml")


def test_the_backbone_job_runs_once_and_is_reused(tmp_path, isolated_cache):
    from harness.results import run_records
    from harness.runner.plan import expand, prepare
    from harness.runner.run import run_suite

    suite = _suite(tmp_path)
    jobs = expand(prepare(suite))
    backbone = [j for j in jobs if j.kind == "backbone"]
    assert len(backbone) == 1  # one per data set, for both categories and both method entries
    fits = [j for j in jobs if j.kind == "fit"]
    assert fits and all(j.deps == (backbone[0].key,) for j in fits)
    assert {j.tags["backbone"] for j in fits} == {backbone[0].tags["backbone"]}
    first = run_suite(suite, executor="serial", results=tmp_path / "a", progress=False)
    assert set(first.states.values()) == {"done"}, first.states
    info = json.loads((first.store.job_dir(backbone[0].key) / "backbone.json").read_text())
    assert info["reused"] is False and (isolated_cache / "backbones" / info["key"]).is_dir()
    records = run_records(first.store)
    assert set(records["metric"]) == {"bg_psnr", "mask_iou"}
    assert set(records["method"]) == {"background_aware", "bg-aware init: random"}
    assert set(records["backbone"]) == {backbone[0].tags["backbone"]}
    # another results folder: the backbone comes from results/cache/backbones, not trained again
    second = run_suite(suite, executor="serial", results=tmp_path / "b", progress=False)
    again = json.loads((second.store.job_dir(backbone[0].key) / "backbone.json").read_text())
    assert again["reused"] is True and again["key"] == info["key"]
    # other pretraining settings are another backbone, and another key for every fit
    other = expand(prepare(_suite(tmp_path, backbone={"vae_steps": 4, "unet_steps": 3})))
    assert not {j.key for j in other if j.kind in ("backbone", "fit")} & {j.key for j in jobs}


def test_backbone_settings_and_weights_errors_are_named(tmp_path, pretrained_backbone):
    from harness import weights
    from harness.errors import ConfigError, WeightsError
    from harness.runner.backbone_jobs import backbone_jobs
    from harness.runner.plan import prepare

    with pytest.raises(ConfigError, match="backbone: unknown pretraining settings \\['vae_step'\\]"):
        _suite(tmp_path, backbone={"vae_step": 3})
    with pytest.raises(WeightsError, match="not a diffusers folder"):
        weights.resolve_pipeline("stable-diffusion-v1-5", tmp_path)
    # the paper profile resolves SD 1.5 from the suite's weights: here the tiny stand-in's folder
    suite = _suite(tmp_path, profile="paper", backbone={},
                   weights={"stable-diffusion-v1-5": str(pretrained_backbone[0])})
    jobs = backbone_jobs(prepare(suite))  # (the paper profile's Inception and VGG are not on this machine)
    assert [j.tags["backbone"] for j in jobs] == ["stable-diffusion-v1-5:config"]
    assert jobs[0].where["weights"] == str(pretrained_backbone[0])  # where it lies: not part of the key
