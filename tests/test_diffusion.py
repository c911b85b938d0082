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
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        scheduler = ddim.make_scheduler(name, base)
        assert type(scheduler).__name__ == name and scheduler.config.beta_end == base.config.beta_end
        assert torch.isfinite(ddim.sample_with(scheduler, model, z_T, 10)).all()
    with pytest.raises(ValueError, match="unknown scheduler 'Nope'"):
        ddim.make_scheduler("Nope", base)


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
    assert text.shape == (2, 16, 64) and latents.shape == (2, 8, 16, 16) and eps.shape == latents.shape
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    # the paper profile's code path (from_pretrained on a folder in diffusers' layout), with the tiny stand-in
    tiny.save(tmp_path / "backbone")
    loaded = backbone.load(tmp_path / "backbone")
    assert loaded.latent_scale == 1.0 and loaded.tokenizer(["a sks weave"]).input_ids == tiny.tokenizer(["a sks weave"]).input_ids
    with torch.no_grad():
        again = loaded.unet(latents, 10, encoder_hidden_states=loaded.encode_text(["a photo of a weave", "a photo of a tray"])).sample
    assert torch.allclose(again, eps, atol=1e-5)  # the same network; its sums may run in another order (2e-6)


def _stats(images: torch.Tensor) -> torch.Tensor:
    """Pixel statistics of a set of images in [-1, 1]: channel means and stds, mean gradient magnitudes."""
    dx = (images[..., 1:] - images[..., :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return torch.cat([images.mean((0, 2, 3)), images.std((0, 2, 3)), dx[None], dy[None]])


def test_pretraining_brings_samples_closer_to_the_normal_images(synth_root, pretrained_backbone):
    from harness.data.layouts import read_category
    from harness.diffusion import backbone as backbones
    from harness.diffusion.pretrain import prompt_for, to_model_input

    folder, info = pretrained_backbone
    history = info["history"]
    assert history["vae"][-1] < history["vae"][0] and history["unet"][-1] < history["unet"][0]
    assert info["images"] == {"weave": 10, "washer": 10}  # train/good minus the normal validation tenth
    images = np.stack([s.load_image(64) for name in ("weave", "washer")
                       for s in read_category(synth_root, name, dataset="synthetic").train_good])
    trained = backbones.load(folder)
    untrained = backbones.build_tiny(["washer", "weave"], 64, seed=0)
    real = _stats(to_model_input(images))
    distances = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        with torch.no_grad():
            text = model.encode_text([prompt_for(c) for c in ("weave", "washer") for _ in range(4)])
            channels = model.unet.config.in_channels
            noise = torch.randn(8, channels, 16, 16, generator=torch.Generator().manual_seed(0))
            z0 = ddim.sample(lambda z, t, c: model.unet(z, t, encoder_hidden_states=c).sample, noise,
                             model.scheduler, 20, text)
            distances[name] = (_stats(model.decode_latents(z0)) - real).norm().item()
    # measured: trained 0.20, untrained 0.74
    assert distances["trained"] < 0.5 * distances["untrained"]


def test_masked_cross_attention_matches_equations_10_and_11():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from harness.diffusion.attention import MaskedCrossAttnProcessor, MaskState, mask_for

    torch.manual_seed(0)
    heads, dim_head, tokens = 2, 4, 3
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=heads, dim_head=dim_head).eval()
    z = torch.randn(2, 16, 8)  # a 4x4 map of queries
    c_a, c_b = torch.randn(2, tokens, 6), torch.randn(2, tokens, 6)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()  # latent resolution, twice the map's
    state = MaskState(mask=mask, tokens=tokens, record_token=1)
    with torch.no_grad():
        ours = MaskedCrossAttnProcessor(state)(attn, z, torch.cat([c_a, c_b], 1))

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
        assert torch.allclose(mask_for(mask, 16), m)
        # the recorded map is the region token's attention, averaged over heads
        assert torch.allclose(state.recorded[0], p_a[..., 1].mean(1).reshape(2, 1, 4, 4), atol=1e-6)
        # all-ones / all-zeros masks give diffusers' own cross-attention on one prompt
        for value, prompt in ((1.0, c_a), (0.0, c_b)):
            state.mask = torch.full_like(mask, value)
            assert torch.allclose(MaskedCrossAttnProcessor(state)(attn, z, torch.cat([c_a, c_b], 1)),
                                  AttnProcessor()(attn, z, prompt), atol=1e-6)


def test_processors_swap_on_cross_attention_layers_only(tiny_unet):
    from harness.diffusion.attention import MaskedCrossAttnProcessor, MaskState, cross_attention_layers, \
        set_cross_attention_processor

    state = MaskState(mask=torch.ones(1, 1, 8, 8), tokens=3, record_token=0)
    previous = set_cross_attention_processor(tiny_unet, lambda name: MaskedCrossAttnProcessor(state))
    try:
        swapped = [k for k, p in tiny_unet.attn_processors.items() if isinstance(p, MaskedCrossAttnProcessor)]
        assert swapped and all(k.endswith("attn2.processor") for k in swapped)
        assert len(swapped) == len(cross_attention_layers(tiny_unet))
        with torch.no_grad():
            out = tiny_unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 6, 16)).sample
        assert out.shape == (1, 4, 8, 8) and len(state.recorded) == len(swapped)
    finally:
        tiny_unet.set_attn_processor(previous)
    assert not any(isinstance(p, MaskedCrossAttnProcessor) for p in tiny_unet.attn_processors.values())


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
