"""harness/diffusion: the DDIM step against diffusers, and inversion followed by sampling reconstructing the latent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from harness.diffusion import ddim


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.5's DDIM settings."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def test_sampling_step_equals_diffusers_ddim():
    scheduler = sd_scheduler()
    torch.manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in ddim.timesteps(scheduler, 10):
        expected = scheduler.step(eps, t, z, eta=0.0).prev_sample
        ours = ddim.ddim_step(z, eps, ddim.alpha_at(scheduler, t), ddim.alpha_at(scheduler, ddim.previous(scheduler, t, 10)))
        assert torch.allclose(ours, expected, atol=1e-5), t


def test_stochastic_step_equals_diffusers_ddim_with_eta():
    scheduler = sd_scheduler()
    torch.manual_seed(0)
    z, eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in ddim.timesteps(scheduler, 10)[:-1]:
        expected = scheduler.step(eps, t, z, eta=0.7, variance_noise=noise).prev_sample
        ours = ddim.ddim_step(z, eps, ddim.alpha_at(scheduler, t), ddim.alpha_at(scheduler, ddim.previous(scheduler, t, 10)),
                              eta=0.7, noise=noise)
        assert torch.allclose(ours, expected, atol=1e-5), t
    with pytest.raises(ValueError, match="needs noise"):
        ddim.ddim_step(z, eps, 0.5, 0.6, eta=0.5)


def test_any_scheduler_by_name_and_ddim_through_it_equals_ours():
    torch.manual_seed(2)
    z_T, base = torch.randn(1, 4, 8, 8), sd_scheduler()
    model = lambda z, t, c: 0.1 * z + 0.01 * t / 1000  # noqa: E731  (a smooth stand-in for a UNet)
    ours = ddim.sample(model, z_T, base, 10)
    theirs = ddim.sample_with(ddim.make_scheduler("DDIMScheduler", base), model, z_T, 10)
    assert torch.allclose(ours, theirs, atol=1e-5)
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler"):
        scheduler = ddim.make_scheduler(name, base)
        assert type(scheduler).__name__ == name and scheduler.config.beta_end == base.config.beta_end
        assert torch.isfinite(ddim.sample_with(scheduler, model, z_T, 10)).all()
    with pytest.raises(ValueError, match="unknown scheduler 'Nope'"):
        ddim.make_scheduler("Nope", base)


def test_v_prediction_target_and_noise_equal_diffusers():
    """training_target is diffusers' get_velocity for a v-prediction scheduler and the noise otherwise;
    predicted_noise inverts it; sampling a v-model through it equals diffusers' own v-prediction DDIM step."""
    eps_scheduler = sd_scheduler()
    v_scheduler = DDIMScheduler.from_config(eps_scheduler.config, prediction_type="v_prediction")
    torch.manual_seed(5)
    z0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990])
    assert torch.equal(ddim.training_target(eps_scheduler, z0, noise, t), noise)
    v = ddim.training_target(v_scheduler, z0, noise, t)
    assert torch.allclose(v, v_scheduler.get_velocity(z0, noise, t), atol=1e-6)
    z_t = v_scheduler.add_noise(z0, noise, t)
    assert torch.allclose(ddim.predicted_noise(v_scheduler, v, z_t, t), noise, atol=1e-5)
    assert torch.equal(ddim.predicted_noise(eps_scheduler, noise, z_t, t), noise)
    assert torch.allclose(ddim.predicted_noise(v_scheduler, v[1:2], z_t[1:2], 500), noise[1:2], atol=1e-5)  # an int t
    v_model = lambda z, t, c: 0.3 * z - 0.02 * t / 1000  # noqa: E731  (outputs v)
    ours = ddim.sample(lambda z, t, c: ddim.predicted_noise(v_scheduler, v_model(z, t, c), z, t), z0, v_scheduler, 10)
    v_scheduler.set_timesteps(10)
    theirs = z0
    for step in v_scheduler.timesteps:
        theirs = v_scheduler.step(v_model(theirs, int(step), None), step, theirs, eta=0.0).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-4)
    # sample_with takes noise from its model whatever the scheduler's parametrization
    through = ddim.sample_with(ddim.make_scheduler("DDIMScheduler", v_scheduler),
                               lambda z, t, c: ddim.predicted_noise(v_scheduler, v_model(z, t, c), z, t), z0, 10)
    assert torch.allclose(through, theirs, atol=1e-4)
    with pytest.raises(ValueError, match="sample"):
        ddim.predicts_velocity(DDIMScheduler.from_config(eps_scheduler.config, prediction_type="sample"))


def test_blended_sampling_keeps_the_known_latent_outside_the_mask():
    torch.manual_seed(3)
    scheduler, known, z_T = sd_scheduler(), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    model = lambda z, t, c: 0.5 * z  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    out = ddim.blended_sample(model, z_T, known, mask, scheduler, 10, eta=0.5, generator=generator)
    outside = (1 - mask).bool().expand_as(out)
    assert torch.equal(out[outside], known[outside])
    assert not torch.allclose(out[~outside], known[~outside], atol=0.1)
    plain = ddim.sample(model, z_T, scheduler, 10)
    assert not torch.allclose(out[~outside], plain[~outside], atol=1e-3)  # the context reaches the masked region


def test_blending_before_each_call_shows_the_model_the_renoised_known_latent_at_that_timestep():
    """AnomalyDiffusion's rule: before the UNet call at t, outside the mask z_t = q_sample(known, t) with fresh noise;
    no blend after the last step. A mask may change with t (its adaptive dilation)."""
    torch.manual_seed(4)
    scheduler, known, z_T = sd_scheduler(), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    seen = []

    def model(z, t, c):
        seen.append((t, z.clone()))
        return 0.5 * z

    def grows(t):  # a mask that changes with t, as AnomalyDiffusion's adaptive dilation
        wider = mask.clone()
        wider[..., 2:5, 3:6 + int(t) // 400] = 1
        return wider

    out = ddim.blended_sample(model, z_T, known, grows, scheduler, 10,
                              generator=torch.Generator().manual_seed(0), blend="before")
    replay = torch.Generator().manual_seed(0)
    for t, z in seen:
        alpha = scheduler.alphas_cumprod[t]
        expected = alpha.sqrt() * known + (1 - alpha).sqrt() * torch.randn(known.shape, generator=replay)
        outside = (1 - grows(t)).bool().expand_as(known)
        assert torch.allclose(z[outside], expected[outside], atol=1e-6), t
    outside = (1 - mask).bool().expand_as(known)
    assert torch.allclose(seen[0][1][~outside], z_T[~outside])  # inside: the sampler's own latent
    assert not torch.allclose(out[outside], known[outside], atol=1e-3)  # no blend after the last step
    everything = ddim.blended_sample(model, z_T, known, torch.ones(1, 1, 8, 8), scheduler, 10, blend="before")
    assert torch.allclose(everything, ddim.sample(model, z_T, scheduler, 10), atol=1e-6)
    with pytest.raises(ValueError, match="blend"):
        ddim.blended_sample(model, z_T, known, mask, scheduler, 10, blend="sideways")


def test_one_generator_per_sample_makes_a_samples_noise_independent_of_its_batch():
    scheduler, known = sd_scheduler(), torch.randn(3, 4, 8, 8)
    z_T, mask = torch.randn(3, 4, 8, 8), torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    model = lambda z, t, c: 0.5 * z  # noqa: E731

    def run(rows):
        generators = [torch.Generator().manual_seed(10 + r) for r in rows]
        return ddim.blended_sample(model, z_T[rows], known[rows], mask, scheduler, 5, eta=1.0, generator=generators,
                                   blend="before")

    together = run([0, 1, 2])
    assert torch.allclose(together[1:2], run([1]), atol=1e-6) and torch.allclose(together[2:], run([2]), atol=1e-6)
    with pytest.raises(ValueError, match="generators"):
        ddim.blended_sample(model, z_T, known, mask, scheduler, 5, eta=1.0, generator=[torch.Generator()])


def test_guidance_in_one_stacked_call_equals_two_calls():
    calls = []

    def model(z, t, c):
        calls.append(len(z))
        return z * c

    z, c, u = torch.ones(3, 1), torch.full((3, 1), 2.0), torch.ones(3, 1)
    stacked = ddim.guided_stacked(model, 7.5)(z, 0, (c, u))
    assert calls == [6] and torch.allclose(stacked, ddim.guided(model, 7.5)(z, 0, (c, u)))


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    return unet


def test_inversion_then_sampling_reconstructs_the_latent(tiny_unet):
    scheduler = sd_scheduler()
    torch.manual_seed(1)
    z0 = torch.randn(1, 4, 8, 8)
    condition = torch.randn(1, 3, 16)

    @torch.no_grad()
    def eps(z, t, c):
        return 0.5 * tiny_unet(z, t, encoder_hidden_states=c).sample

    errors = {}
    for steps in (10, 50, 200):
        z_T = ddim.invert(eps, z0, scheduler, steps, condition)
        back = ddim.sample(eps, z_T, scheduler, steps, condition)
        errors[steps] = ((back - z0).norm() / z0.norm()).item()
    # measured with this random UNet: 0.31, 0.12, 0.041 (a trained, smoother UNet does better)
    assert errors[200] < errors[50] < errors[10]
    assert errors[200] < 0.06 and errors[200] < errors[10] / 5
    # with a noise prediction that does not depend on the latent, inversion is exactly undone
    constant = torch.randn_like(z0)
    z_T = ddim.invert(lambda z, t, c: constant, z0, scheduler, 10)
    assert torch.allclose(ddim.sample(lambda z, t, c: constant, z_T, scheduler, 10), z0, atol=1e-5)


def test_classifier_free_guidance_combines_predictions():
    model = lambda z, t, c: z * c  # noqa: E731
    z = torch.ones(1)
    assert ddim.guided(model, 7.5)(z, 0, (2.0, 1.0)).item() == pytest.approx(1.0 + 7.5 * (2.0 - 1.0))
    assert ddim.guided(model, 1.0)(z, 0, (2.0, 1.0)).item() == pytest.approx(2.0)


def test_tiny_backbone_shapes_tokens_and_the_from_pretrained_path(tmp_path):
    from harness.diffusion import backbone

    tiny = backbone.build_tiny(["weave", "washer", "tray", "metal_nut"], resolution=64)
    ids = tiny.tokenizer(["a photo of a sks metal_nut"]).input_ids[0]
    assert tiny.tokenizer.unk_token_id not in ids and len(ids) == 9  # <bos> a photo of a sks metal nut <eos>
    assert tiny.tokenizer.convert_ids_to_tokens(ids[5]) == "sks"
    with torch.no_grad():
        text = tiny.encode_text(["a photo of a weave", "a photo of a tray"])
        latents = tiny.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
        eps = tiny.unet(latents, 10, encoder_hidden_states=text).sample
        images = tiny.decode_latents(latents)
    assert text.shape == (2, 32, 64) and latents.shape == (2, 16, 16, 16) and eps.shape == latents.shape
    # cross-attention at the latent resolution (16 x 16 here), as in SD
    attention_sizes = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: attention_sizes.add(i[0].shape[1]))
             for n, m in tiny.unet.named_modules() if n.endswith('attn2')]
    with torch.no_grad():
        tiny.unet(latents, 10, encoder_hidden_states=text)
    [h.remove() for h in hooks]
    assert max(attention_sizes) == 16 * 16
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    # the paper profile's code path (from_pretrained on a folder in diffusers' layout), with the tiny stand-in
    tiny.save(tmp_path / "backbone")
    loaded = backbone.load(tmp_path / "backbone")
    assert loaded.latent_scale == 1.0 and loaded.tokenizer(["a sks weave"]).input_ids == tiny.tokenizer(["a sks weave"]).input_ids
    with torch.no_grad():
        again = loaded.unet(latents, 10, encoder_hidden_states=loaded.encode_text(["a photo of a weave", "a photo of a tray"])).sample
    # the same network; built, its UNet is channels-last, loaded plainly, so its sums run in another order (1e-5)
    assert torch.allclose(again, eps, atol=1e-4)
    assert not torch.allclose(again, eps + 1e-3, atol=1e-4)


def test_a_v_prediction_backbone_is_pretrained_on_v_and_says_so(tmp_path):
    """`prediction_type: v_prediction` pretrains the UNet on v (its loss is the v target's, not the noise's) and the
    saved backbone's scheduler says so, so every sampler converts its outputs (ddim.predicted_noise)."""
    from harness.diffusion import backbone as backbones
    from harness.diffusion import pretrain as pre

    rng = np.random.default_rng(0)
    images, categories = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), ["a", "b"] * 2
    settings = dict(resolution=32, vae_steps=2, unet_steps=3, vae_batch=2, vae_crop=16, batch_size=2,
                    checkpoint_every=0)
    runs = {}
    for kind in ("epsilon", "v_prediction"):
        model, history = pre.pretrain(images, categories, pre.PretrainConfig(**settings, prediction_type=kind))
        model.save(tmp_path / kind)
        runs[kind] = (backbones.load(tmp_path / kind), history)
    assert not ddim.predicts_velocity(runs["epsilon"][0].scheduler)
    assert ddim.predicts_velocity(runs["v_prediction"][0].scheduler)
    assert runs["epsilon"][1]["vae"] == runs["v_prediction"][1]["vae"]  # the same autoencoder stage
    assert runs["epsilon"][1]["unet"] != runs["v_prediction"][1]["unet"]  # another target
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        backbones.build_tiny(["a"], 32, prediction_type="sample")


def test_the_autoencoder_stage_in_bfloat16_learns_as_in_float32(monkeypatch):
    """`vae_autocast: auto` runs the autoencoder's forward pass in bf16 where the machine computes bf16
    natively (here pretended, so the test runs on any CPU); its weights, optimiser and loss stay in float32. It
    changes the arithmetic (another loss history) and the loss falls as far as in float32."""
    from harness import device
    from harness.diffusion import pretrain as pre

    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: True)

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32)
    images = np.stack([np.stack([np.add.outer(ramp * a, ramp * (1 - a)) / 2] * 3, -1) for a in rng.random(6)])
    settings = dict(resolution=32, vae_steps=40, unet_steps=0, vae_batch=4, vae_crop=16, vae_augment=False,
                    checkpoint_every=0)
    histories = {}
    for kind in ("float32", "auto"):
        _, history = pre.pretrain(images.astype(np.uint8), ["a"] * 6, pre.PretrainConfig(**settings, vae_autocast=kind))
        histories[kind] = history["vae"]
    assert histories["auto"] != histories["float32"]  # autocast is on
    for history in histories.values():
        assert history[-1] < 0.5 * history[0], histories
    assert histories["auto"][-1] < 1.5 * histories["float32"][-1], histories
    with pytest.raises(ValueError, match="autocast must be one of"):
        pre.pretrain(images.astype(np.uint8), ["a"] * 6, pre.PretrainConfig(**settings, vae_autocast="int8"))


def test_a_killed_pretraining_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Checkpoints every 2 steps; a run killed in the VAE stage and one killed in the UNet stage each resume to
    exactly the weights and loss history of a run that was never stopped (on a GPU: to round-off), and an estimate
    is announced first."""
    from harness.diffusion import pretrain as pre

    rng = np.random.default_rng(0)
    images, categories = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), ["a", "b"] * 3
    config = pre.PretrainConfig(resolution=32, vae_steps=5, unet_steps=5, vae_batch=2, vae_crop=16, batch_size=2,
                                checkpoint_every=2)
    said, same = [], _same_up_to_the_device()
    whole, history = pre.pretrain(images, categories, config, announce=said.append)
    assert len(said) == 1 and "about" in said[0] and "5 autoencoder + 5 UNet steps" in said[0]
    for stage, kill_at in (("VAE", 3), ("UNet", 4)):
        folder = tmp_path / stage
        folder.mkdir()
        real_run, calls = pre._Stage.run, {"n": 0}

        def dying(self, step_loss, saved, progress, stage=stage, kill_at=kill_at):
            if self.name != stage:
                return real_run(self, step_loss, saved, progress)

            def counted():
                calls["n"] += 1
                if calls["n"] > kill_at:
                    raise KeyboardInterrupt
                return step_loss()
            return real_run(self, counted, saved, progress)

        monkeypatch.setattr(pre._Stage, "run", dying)
        with pytest.raises(KeyboardInterrupt):
            pre.pretrain(images, categories, config, checkpoints=folder)
        monkeypatch.setattr(pre._Stage, "run", real_run)
        assert (folder / pre.CHECKPOINT).is_file()
        resumed, resumed_history = pre.pretrain(images, categories, config, checkpoints=folder)
        assert resumed_history.pop("seconds").keys() == history["seconds"].keys()  # time spent: not the same
        assert same(resumed_history, {k: v for k, v in history.items() if k != "seconds"}), (stage, resumed_history)
        for name in ("vae", "unet", "text_encoder"):
            for (key, a), b in zip(getattr(whole, name).state_dict().items(),
                                   getattr(resumed, name).state_dict().values()):
                assert same(a, b), (stage, name, key)


def _same_up_to_the_device():
    """Exact equality on the CPU; on a GPU, equality to round-off: its convolution kernels add in an order that
    varies from run to run (seen on an H100: losses equal to 1e-5), so no two runs there are bitwise equal, killed
    or not. Weights get a looser bound: Adam's step is about the learning rate for any gradient that is tiny, so
    round-off can move such a weight by up to the rate (3e-3 here) per step."""
    from harness.device import default_device

    if default_device().type == "cpu":
        return lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    return lambda a, b: (torch.allclose(a.float(), b.float(), rtol=0, atol=2e-2) if isinstance(a, torch.Tensor)
                         else a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-3) for k in a))


def test_vae_crops_get_generic_content():
    """Random shapes on the VAE's crops (pretrain.generic_content): seeded, the crops' size and type kept, most
    crops changed somewhere, and the unchanged pixels of an unflipped grey crop only rescaled in colour."""
    from harness.diffusion.pretrain import generic_content

    crops = np.full((32, 32, 32, 3), 128, np.uint8)
    first, again = (generic_content(np.random.default_rng(0), crops) for _ in range(2))
    assert first.dtype == np.uint8 and first.shape == crops.shape and np.array_equal(first, again)
    modal = np.array([np.median(c.reshape(-1, 3), axis=0) for c in first])  # each crop's colour-scaled grey
    with_shapes = [(np.abs(c.astype(int) - m).max(axis=2) > 2).any() for c, m in zip(first, modal)]
    assert 0.5 < np.mean(with_shapes) < 1.0  # zero to three shapes per crop
