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
from harness.data.images import read_image, read_mask
from harness.generation import fit_method, generate_to
from harness.methods import get_method_info, load_method
from harness.tasks import build_request, build_task

from tests.claims import claim_tests, grown, measure


@pytest.fixture(scope="module")
def equations():
    return sys.modules[get_method_info("background_aware").cls.__module__]


@pytest.fixture(scope="module")
def attention(equations):
    import importlib

    return importlib.import_module(equations.__package__ + ".attention")


def test_masked_cross_attention_matches_equations_10_and_11(attention):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from harness.diffusion.processors import LayerProcessor, Recorder

    torch.manual_seed(0)
    heads, dim_head, tokens = 2, 4, 3
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=heads, dim_head=dim_head).eval()
    z = torch.randn(2, 16, 8)  # a 4x4 map of queries
    c_a, c_b = torch.randn(2, tokens, 6), torch.randn(2, tokens, 6)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()  # latent resolution, twice the map's
    processor = LayerProcessor("layer", attention.behaviours("layer", attn))
    recorder = Recorder(tokens=(1,))
    with torch.no_grad():
        ours = processor(attn, z, torch.cat([c_a, c_b], 1), context=attention.context_for(mask, tokens, record=recorder))

        def direct(c):  # softmax(Q K^T / sqrt(d)) V per head, written out
            q = attn.to_q(z).view(2, 16, heads, dim_head).transpose(1, 2)
            k = attn.to_k(c).view(2, tokens, heads, dim_head).transpose(1, 2)
            v = attn.to_v(c).view(2, tokens, heads, dim_head).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) / dim_head ** 0.5, dim=-1)
            return (p @ v).transpose(1, 2).reshape(2, 16, heads * dim_head), p

        (o_a, p_a), (o_b, _) = direct(c_a), direct(c_b)
        # m': a 4x4 position is in the mask if any of its 2x2 latent cells is
        m = mask.reshape(2, 1, 4, 2, 4, 2).amax((3, 5)).flatten(2).transpose(1, 2)
        expected = attn.to_out[0](m * o_a + (1 - m) * o_b)
        assert torch.allclose(ours, expected, atol=1e-6)
        assert torch.allclose(attention.mask_for(mask, 16), m)
        # the recorded map is the region token's attention (C_a only), averaged over heads
        assert torch.allclose(recorder.maps["layer"][0], p_a[..., 1].mean(1).reshape(2, 1, 4, 4), atol=1e-6)
        # all-ones / all-zeros masks give diffusers' own cross-attention on one prompt; no two prompts: plain
        for value, prompt in ((1.0, c_a), (0.0, c_b)):
            context = attention.context_for(torch.full_like(mask, value), tokens)
            assert torch.allclose(processor(attn, z, torch.cat([c_a, c_b], 1), context=context),
                                  AttnProcessor()(attn, z, prompt), atol=1e-6)
        assert torch.allclose(processor(attn, z, c_a), AttnProcessor()(attn, z, c_a), atol=1e-6)
        with pytest.raises(ValueError, match="not two prompts"):
            processor(attn, z, c_a, context=attention.context_for(mask, tokens))


def test_the_masked_rule_reaches_every_cross_attention_layer_of_a_unet(attention):
    """Installed through the toolkit, the processor changes every cross-attention call (a mask of ones and of zeros
    give the UNet on prompt a and on prompt b) and records one map per cross-attention layer."""
    from diffusers import UNet2DConditionModel

    from harness.diffusion import processors

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    z, c_a, c_b = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        plain = {name: unet(z, 10, encoder_hidden_states=c).sample for name, c in (("a", c_a), ("b", c_b))}
        with processors.installed(unet, attention.behaviours):
            recorder = processors.Recorder(tokens=(0,))
            for value, name in ((1.0, "a"), (0.0, "b")):
                context = attention.context_for(torch.full((1, 1, 8, 8), value), 3, record=recorder)
                out = unet(z, 10, encoder_hidden_states=torch.cat([c_a, c_b], 1),
                           cross_attention_kwargs={"context": context}).sample
                assert torch.allclose(out, plain[name], atol=1e-5)
    cross_layers = [n for n, mod in unet.named_modules() if n.endswith("attn2")]
    assert sorted(recorder.maps) == sorted(cross_layers) and all(len(v) == 2 for v in recorder.maps.values())


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
    # attention spread over the whole mask with a bump on part of it: the mask follows the bump, not the mask
    # (scaled by its peak alone, 0.5 / 0.8 >= 1/2 everywhere would give back the whole target mask)
    spread = attention + 0.5
    refined = equations.refine_mask(spread, _mask(1), 32)
    inside = np.kron(_mask(1)[0, 0].numpy(), np.ones((4, 4))).astype(bool)
    assert refined[0, 8:16, 12:20].mean() > 0.5 and 0 < refined.sum() < 0.7 * inside.sum()
    assert not (refined[0] & ~inside).any()  # never outside the target mask


def _task(root, backbone, category: str, defect: str):
    task = build_task(make_split(read_category(root, category, dataset="synthetic")), [defect], 64, seed=0)
    task.backbone = backbone[0]
    return task


@pytest.fixture(scope="module")
def washer_task(synth_root, pretrained_backbone):
    return _task(synth_root, pretrained_backbone, "washer", "stain")


@pytest.fixture(scope="module")
def weave_task(synth_root, pretrained_backbone):
    return _task(synth_root, pretrained_backbone, "weave", "hole")


# ---- the paper's claims after fitting, each with broken variants that must fail it ------------------------------

FIT_STEPS = 150


def _generate(task, workdir, n=6, **overrides):
    method = load_method("background_aware", "tiny", {"steps": FIT_STEPS, **overrides})
    request = build_request(task, method, task.defect_types[0], n, seed=3)
    return list(method.generate(request, workdir)), request


# The claims on the shipped backbone (trained at 128 px, used here at 64 px; weave/hole, 150 steps, guidance 4, 25 DDIM
# steps); each run writes every variant's values to results/bench/claims-background_aware.json (the README's table).
# The shipped backbone draws a bright blob in the mask even untuned, so contrast alone no longer tells a fitted model
# from an untuned one; the colour does: the fitted model's mask stays near the line from the normal colour to the
# training defects' (its hole comes with a bright rim: slightly away), the untuned prior's and the swapped prompts'
# move far away from it. The background bound sits between the working method and no background path.
CLAIMS = {
    "background kept (Prop. 1)": lambda m: m["background"] >= 36.0,
    "defect drawn in the mask": lambda m: m["contrast"] >= 1.28 and m["defect"] >= -0.25,
}


def _no_background_path(eps_both, z_T, z_T_masked, m, scheduler, steps):
    """Broken Algorithm 1: z_t* is denoised with the C1 prediction everywhere (no Eq. 9 mix, no background path)."""
    from harness.diffusion import ddim

    z = z_T
    for t in ddim.timesteps(scheduler, steps):
        _, eps_defect = eps_both(z_T_masked, z, t)
        z = ddim.ddim_step(z, eps_defect, ddim.alpha_at(scheduler, t),
                           ddim.alpha_at(scheduler, ddim.previous(scheduler, t, steps)))
    return z, z_T_masked


@pytest.fixture(scope="module")
def variants(weave_task, tmp_path_factory, equations):
    """background_aware fitted on weave/hole (64 px), then the measurements of the working method and of four
    broken variants: no fine-tuning, C1 and C2 swapped at sampling, no background path, no inversion."""
    fitted, untuned = tmp_path_factory.mktemp("fitted"), tmp_path_factory.mktemp("untuned")
    fit_method(load_method("background_aware", "tiny", {"steps": FIT_STEPS}), weave_task, fitted)
    fit_method(load_method("background_aware", "tiny", {"steps": 0}), weave_task, untuned)
    out = {}

    def run(name, workdir, **overrides):
        samples, request = _generate(weave_task, workdir, **overrides)
        out[name] = {**measure(weave_task, samples, request), "samples": samples, "request": request,
                     "workdir": workdir}

    run("working", fitted)
    run("no fine-tuning", untuned)
    run("no inversion", fitted, init="random")
    mp = pytest.MonkeyPatch()
    try:
        original_init = equations.Conditions.__init__

        def swapped(self, backbone, prompts):
            original_init(self, backbone, prompts)
            self.c1, self.c2 = self.c2, self.c1

        mp.setattr(equations.Conditions, "__init__", swapped)
        run("C1/C2 swapped", fitted)
        mp.undo()
        mp.setattr(equations, "background_aware_sampling", _no_background_path)
        run("no background path", fitted)
    finally:
        mp.undo()
    for name, m in out.items():  # (-s shows them)
        print(f"{name:20s} background {m['background']:.2f} dB  contrast {m['contrast']:.2f}  defect {m['defect']:.2f}")
    return out


# Negative controls: a claim test that a broken method also passes tests nothing.
test_the_working_method_holds_every_claim, test_each_control_fails_its_claims = claim_tests(
    CLAIMS, "variants",
    [(control, None) for control in ("no fine-tuning", "C1/C2 swapped", "no background path", "no inversion")])


@pytest.mark.slow  # the claims: too slow for make test, run in CI's second step
def test_samples_are_seeded_and_masks_refined_inside_the_target(weave_task, variants):
    samples, request = variants["working"]["samples"], variants["working"]["request"]
    refined_differs = False
    for sample, target in zip(samples, request.targets):
        assert sample.image.shape == (64, 64, 3) and sample.mask.shape == (64, 64)
        assert sample.mask.any() and sample.normal_id == target.normal.id
        # the refined mask stays in the latent mask's cells (4 px) plus the bilinear upsampling's reach (one cell)
        assert not (sample.mask & ~grown(_dilated(target.mask, 4), 4)).any()
        refined_differs |= not np.array_equal(sample.mask, _dilated(target.mask, 4)) and \
            not np.array_equal(sample.mask, target.mask)
    assert refined_differs  # Eq. 13 follows the defect token's attention, not the target mask
    # the same seed gives the same images; refine_mask: false gives the target masks
    again, _ = _generate(weave_task, variants["working"]["workdir"], refine_mask=False)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again))
    assert all(np.array_equal(a.mask, t.mask) for a, t in zip(again, request.targets))


def _dilated(mask: np.ndarray, cell: int) -> np.ndarray:
    """The mask grown to whole latent cells (what the max-pooled latent mask covers)."""
    h, w = mask.shape
    cells = mask.reshape(h // cell, cell, w // cell, cell).any((1, 3))
    return np.kron(cells, np.ones((cell, cell), dtype=bool)).astype(bool)


def test_the_ablations_sample_plain_ddim_and_bad_settings_are_named(washer_task, tmp_path, equations, monkeypatch):
    """Tables 4-5: `loss: naive` (the Eq. 2 model) and `init: random` sample plain DDIM from N(0, I), never the
    two-path sampler of Algorithm 1; classifier-free guidance on the defect branch runs when asked for."""
    from harness.errors import MethodError

    method = load_method("background_aware", "tiny", {"steps": 3, "loss": "naive", "inference_steps": 3})
    fit_method(method, washer_task, tmp_path)

    def two_paths(*_, **__):
        raise AssertionError("the two-path sampler ran for an ablation")

    monkeypatch.setattr(equations, "background_aware_sampling", two_paths)
    for overrides in ({"loss": "naive"}, {"init": "random"}, {"init": "random", "guidance_scale": 3.0}):
        method = load_method("background_aware", "tiny", {"steps": 3, "inference_steps": 3, **overrides})
        samples = list(method.generate(build_request(washer_task, method, "stain", 2, seed=0), tmp_path))
        assert len(samples) == 2
    with pytest.raises(AssertionError, match="two-path"):
        list(load_method("background_aware", "tiny", {"inference_steps": 3}).generate(
            build_request(washer_task, method, "stain", 1, seed=0), tmp_path))
    with pytest.raises(MethodError, match="init must be one of"):
        load_method("background_aware", "tiny", {"init": "noise"})
    with pytest.raises(MethodError, match="needs a diffusion backbone"):
        method.fit(dataclasses.replace(washer_task, backbone=None), tmp_path / "none")


def test_paper_profile_path_with_a_tiny_stand_in(synth_root, pretrained_backbone, tmp_path):
    """The paper profile loads its backbone with from_pretrained and works at its own resolution (512 there; 96
    here with the tiny stand-in): the harness loads the task at that size, the method fits and generates on it, and
    the written samples come back at the profile's size."""
    method = load_method("background_aware", "paper", {"steps": 2, "inference_steps": 3, "resolution": 96})
    assert method.config["learning_rate"] == 1e-4 and method.config["steps"] == 2 and method.config["lora"]["rank"] == 16
    assert method.working_resolution(64) == 96 and load_method("background_aware", "tiny").working_resolution(64) == 64
    task = build_task(make_split(read_category(synth_root, "washer", dataset="synthetic")), ["stain"],
                      method.working_resolution(64), seed=0)
    task.backbone = pretrained_backbone[0]
    assert task.anomalies[0].image.shape == (96, 96, 3)
    fit_method(method, task, tmp_path / "fit")
    assert json.loads((tmp_path / "fit" / "model.json").read_text())["resolution"] == 96
    out = generate_to(method, task, "stain", 2, 0, tmp_path / "samples", tmp_path / "fit", progress=False,
                      resolution=64)
    meta = json.loads((out / "generation.json").read_text())
    assert (meta["resolution"], meta["working_resolution"]) == (64, 96)
    assert all(read_image(path).shape == (64, 64, 3) for path in sorted((out / "images").glob("*.png")))
    assert all(read_mask(path).shape == (64, 64) for path in sorted((out / "masks").glob("*.png")))


# ---- in the job graph --------------------------------------------------------------------------------------------


def _suite_methods() -> list[dict]:
    return [{"method": "background_aware", "config": {"steps": 2, "inference_steps": 2}},
            {"method": "background_aware", "label": "bg-aware init: random",
             "config": {"steps": 2, "inference_steps": 2, "init": "random"}}]


def _mini() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).parents[3] / "tests" / "suites" / "mini.yaml").read_text())


def _suite(tmp_path, **changes):
    from harness.runner.suite import parse_suite

    raw = _mini()
    raw.update(methods=_suite_methods(), metrics=["bg_psnr", "mask_iou"], backbone={"unet_steps": 3, "batch_size": 2})
    raw.update(changes)
    return parse_suite(raw, tmp_path / "bg.yaml")


def test_backbone_settings_and_weights_errors_are_named(tmp_path, pretrained_backbone):
    from harness import weights
    from harness.errors import ConfigError, WeightsError
    from harness.runner.kinds import KINDS
    from harness.runner.plan import prepare

    with pytest.raises(ConfigError, match=r"backbone: \['vae_step'\] cannot be set"):
        _suite(tmp_path, backbone={"vae_step": 3})
    with pytest.raises(WeightsError, match="not a diffusers folder"):
        weights.resolve_pipeline("stable-diffusion-v1-5", tmp_path)
    # the paper profile resolves SD 1.5 from the suite's weights: here the tiny stand-in's folder
    suite = _suite(tmp_path, profile="paper", backbone={},
                   weights={"stable-diffusion-v1-5": str(pretrained_backbone[0])})
    jobs = KINDS["backbone"].expand(prepare(suite))  # (the paper profile's Inception and VGG are not on this machine)
    assert [j.tags["backbone"][:29] for j in jobs] == ["stable-diffusion-v1-5:sha256:"]
    assert jobs[0].where.weights == str(pretrained_backbone[0])  # where it lies: not part of the key


# ---- the `paper` profile rehearsed end to end on a model in SD 1.5's layout (tests/rehearsal.py) ------------------

def test_the_paper_profile_fits_and_generates_on_sd15s_layout(equations, synth_root, sd15_rehearsal, tmp_path,
                                                              monkeypatch):
    """The paper configuration (Algorithm 1: the disentangled loss, DDIM inversion of the target's background, the
    two paths, the attention-refined mask) once on 512-px content, with only the step counts cut: what trains (the
    rank-16 LoRA on the attention projections, nothing else) and what stays frozen, counted; the adapter's size."""
    from safetensors.torch import load_file

    from harness.diffusion import ddim
    from harness.diffusion.backbone import load_frozen
    from harness.profiles import get_profile
    from tests.rehearsal import lora_parameters, watch

    method = load_method("background_aware", "paper", {"steps": 2, "inference_steps": 2})
    c = method.config
    assert (c["loss"], c["init"], c["refine_mask"], c["guidance_scale"], c["batch_size"], c["learning_rate"],
            c["lora"]["rank"], c["lora"]["alpha"], tuple(c["lora"]["targets"]), c["flips"]) == (
        "disentangled", "inversion", True, 1.0, 1, 1e-4, 16, None, ("to_q", "to_k", "to_v", "to_out.0"), True)
    assert load_method("background_aware", "paper").config["steps"] == 500
    assert load_method("background_aware", "paper").config["inference_steps"] == 50
    size = method.working_resolution(get_profile("paper").resolution)
    assert size == 512
    task = build_task(make_split(read_category(synth_root, "washer", dataset="synthetic")), ["stain"], size, seed=0)
    task.backbone = sd15_rehearsal
    seen = watch(monkeypatch, sys.modules[type(method).__module__])
    work = tmp_path / "fit"
    fit_method(method, task, work)

    backbone = load_frozen(sd15_rehearsal, torch.device("cpu"))
    lora = lora_parameters(backbone.unet, 16)
    (call,) = seen.calls
    assert call["trained"] == lora and call["backbone_trainable"] == {id(p) for p in call["params"]}
    assert call["frozen"] == seen.count(backbone, False)  # the whole SD 1.5 layout, text encoder and VAE included
    saved = load_file(str(work / "lora" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == lora
    assert all(16 in t.shape for t in saved.values())
    assert (work / "lora" / "adapter_model.safetensors").stat().st_size < 4 * lora + 100_000
    print(f"rehearsal: frozen {call['frozen']:,} parameters, trained {lora:,}")

    schedulers = []
    real = ddim.invert
    monkeypatch.setattr(ddim, "invert", lambda eps, z, scheduler, *a, **k: schedulers.append(scheduler) or
                        real(eps, z, scheduler, *a, **k))
    request = build_request(task, method, "stain", 2, seed=0)
    samples = list(method.generate(request, work))
    assert [type(s).__name__ for s in schedulers] == ["DDIMScheduler"]  # Algorithm 1's inversion
    assert len(samples) == 2 and all(s.image.shape == (512, 512, 3) and s.mask.shape == (512, 512) for s in samples)
    assert all(s.extra["init"] == "inversion" and s.extra["refined"] for s in samples)
