"""DualAnoDiff (methods/dualanodiff): the dual-branch attention and SAIM against direct computations, the
branches' separate adapters, guidance that keeps pairs, the part image and its segmentation, fit and generate."""
from __future__ import annotations

import importlib
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from harness.methods import get_method_info, load_method
from tests.claims import claim_tests
from tests.test_diffusion_toolkit import small_text_encoder, small_unet


@pytest.fixture(scope="module")
def dual():
    """The method's modules (importable once discovery has loaded the method's package)."""
    import importlib

    module = sys.modules[get_method_info("dualanodiff").cls.__module__]
    return (module, importlib.import_module(module.__package__ + ".saim"),
            importlib.import_module(module.__package__ + ".segment"))


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised LoRA ups included), so no path is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module


def test_saim_equals_a_direct_computation(dual):
    _, saim, _ = dual
    module = _randomised(saim.SAIM(6))
    o = torch.randn(4, 5, 6)  # two pairs, five positions, six channels
    out = module(o)
    expected = o.clone()
    for pair in range(2):
        for position in range(5):
            u = module.proj_in(module.norm(o[2 * pair:2 * pair + 2, position]))  # (2, C): whole, part
            q, k, v = module.to_q(u), module.to_k(u), module.to_v(u)
            weights = torch.softmax(q @ k.T / math.sqrt(6), dim=1)  # 2 x 2, one head
            expected[2 * pair:2 * pair + 2, position] += module.proj_out(weights @ v)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(saim.SAIM(6, zero_init=True)(o), o)  # W_o = 0: the identity


def _dual_unet(saim_module, seed: int = 0, bcm_hidden: int | None = None):
    unet = small_unet(seed)
    saim_module.install(unet, rank=2, bcm_hidden=bcm_hidden)
    for name, module in unet.named_modules():
        if name.endswith(".processor"):
            _randomised(module, seed)
    return unet


def test_a_loss_on_one_branch_moves_that_branchs_adapters_and_saim_alone(dual):
    """Without SAIM the branches are independent: a loss on the part branch's outputs gives gradients to branch 1's
    LoRAs and none to branch 0's. With SAIM the part reads the whole image's features at every position, so the
    whole branch's adapters get gradients from it too (that is the interaction), and SAIM's own do."""
    _, saim, _ = dual
    unet = _dual_unet(saim)
    z, c = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 16)
    for with_saim in (False, True):
        unet.zero_grad()
        out = unet(z, 10, encoder_hidden_states=c,
                   cross_attention_kwargs={"context": saim.context_for(2, with_saim)}).sample
        out[1::2].pow(2).mean().backward()  # the part branch only
        ups = [m.up.grad for n, m in unet.named_modules() if n.endswith(".processor.lora.q")]
        assert all(g[1].abs().sum() > 0 for g in ups)
        whole = sum(float(g[0].abs().sum()) for g in ups)
        saim_grad = sum(float(p.grad.abs().sum()) for p in saim.saim_parameters(unet) if p.grad is not None)
        if with_saim:
            assert whole > 0 and saim_grad > 0
        else:
            assert whole == 0 and saim_grad == 0


def test_the_text_lora_is_shared_and_trained_through_both_prompts():
    from harness.diffusion.lora import TEXT_TARGETS, LoraSettings, add_lora

    encoder = small_text_encoder()
    params = add_lora(encoder, LoraSettings(rank=2, targets=TEXT_TARGETS))
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    for ids in (torch.tensor([[1, 5, 6, 2]]), torch.tensor([[1, 6, 2, 0]])):  # whole's and part's prompts
        for p in params:
            p.grad = None
        encoder(ids)[0].pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_a_batch_that_is_not_interleaved_pairs_is_an_error(dual):
    _, saim, _ = dual
    unet = _dual_unet(saim)
    context = saim.AttentionContext(saim.SampleBranches(torch.tensor([0, 0, 1, 1])))  # no Pairs: not context_for
    with pytest.raises(ValueError, match="interleaved"):
        unet(torch.randn(4, 4, 8, 8), 10, encoder_hidden_states=torch.randn(4, 3, 16),
             cross_attention_kwargs={"context": context})


def test_guidance_keeps_each_whole_image_with_its_own_part(dual, monkeypatch):
    """The guided prediction of two pairs in one call equals each pair's guided prediction alone: no pair's whole
    image is mixed with another pair's part (a batch with the parts swapped between pairs differs)."""
    module, saim, _ = dual
    method = load_method("dualanodiff", "tiny", {"guidance_scale": 3.0, "scheduler": "DDIMScheduler"})
    backbone = type("Stub", (), {"unet": _dual_unet(saim), "scheduler": DDIMScheduler()})()  # predicts noise
    condition = torch.randn(4, 3, 16)  # [uncond whole, uncond part, cond whole, cond part]
    captured = {}

    def first_prediction(eps, z, scheduler, steps):
        captured["eps"] = eps(z, 10)
        return z

    monkeypatch.setattr(module.ddim, "sample", first_prediction)

    def guided(z_T):
        method._sample(backbone, condition, z_T)
        return captured["eps"]

    z = torch.randn(4, 4, 8, 8)
    together = guided(z)
    alone = torch.cat([guided(z[:2]), guided(z[2:])])
    assert torch.allclose(together, alone, atol=1e-5)
    swapped = guided(z[[0, 3, 2, 1]])  # each whole image with the other pair's part
    assert not torch.allclose(swapped[0], together[0], atol=1e-3)
    # and it is eps_u + s (eps_c - eps_u), each from one pair with its branches' own prompts
    pair = saim.context_for(1)
    eps_u, eps_c = (backbone.unet(z[:2], 10, encoder_hidden_states=text, cross_attention_kwargs={"context": pair}
                                  ).sample for text in (condition[:2], condition[2:]))
    assert torch.allclose(together[:2], eps_u + 3.0 * (eps_c - eps_u), atol=1e-5)


def test_bcm_compensates_the_whole_branchs_self_attention_features_as_eq_5_6(dual):
    import importlib

    module, _, _ = dual
    bcm = importlib.import_module(module.__package__ + ".bcm")
    layer = bcm.BackgroundCompensation(6, 5)
    assert layer.gamma.item() == pytest.approx(0.1)  # the paper's initialisation (the authors' code: 0)
    _randomised(layer)
    phi, phi_b = torch.randn(2, 7, 6), torch.randn(2, 7, 6)
    first, second = layer.mlp[0], layer.mlp[2]
    expected = phi + layer.gamma * (F.gelu(phi_b @ first.weight.T + first.bias) @ second.weight.T + second.bias)
    assert torch.allclose(layer(phi, phi_b), expected, atol=1e-6)
    with pytest.raises(ValueError, match="one background per whole image"):
        layer(phi, phi_b[:1])


def test_bcm_changes_the_whole_branch_alone_and_needs_the_background_pass(dual):
    """The background pass writes the self-attention layers' input features (and only theirs); read in the dual pass,
    they change the whole image's prediction and, without SAIM, not the part's; with no background pass, an error."""
    module, saim, _ = dual
    unet = _dual_unet(saim, bcm_hidden=8)
    z, c = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 16)

    def predict(background_latents):
        features = module._background_features(unet, background_latents, 10, c[0::2])
        self_layers = {n.removesuffix(".processor") for n, p in unet.attn_processors.items() if hasattr(p, "bcm")}
        assert set(features.features) == self_layers and self_layers
        return unet(z, 10, encoder_hidden_states=c, cross_attention_kwargs={
            "context": saim.context_for(2, saim=False, background=features)}).sample

    with torch.no_grad():
        one, other = predict(torch.randn(2, 4, 8, 8)), predict(torch.randn(2, 4, 8, 8))
        assert not torch.allclose(one[0::2], other[0::2], atol=1e-4)
        assert torch.allclose(one[1::2], other[1::2], atol=1e-6)
        empty = saim.bcm.BackgroundFeatures({})
        for background in (empty, None):  # nothing written, or no store at all: never a silent pass without BCM
            with pytest.raises(ValueError, match="background pass"):
                unet(z, 10, encoder_hidden_states=c, cross_attention_kwargs={
                    "context": saim.context_for(2, background=background)})


def test_bcm_compensates_the_keys_and_values_and_not_the_queries(dual):
    """One self-attention layer, LoRAs at their start (zero) and SAIM off: the whole image's output is
    softmax(Q(phi) K(phi')^T / sqrt(d)) V(phi') with phi' = phi + gamma MLP(phi_b); the part's is plain attention."""
    _, saim, _ = dual
    unet = small_unet(0)
    saim.install(unet, rank=2, bcm_hidden=8)
    name, attn = next((n, m) for n, m in unet.named_modules() if n.endswith("attn1"))
    processor = attn.processor
    _randomised(processor.bcm)
    phi, phi_b = torch.randn(2, 16, attn.to_q.in_features), torch.randn(1, 16, attn.to_q.in_features)
    store = saim.bcm.BackgroundFeatures({name: phi_b})
    with torch.no_grad():
        out = processor(attn, phi, context=saim.context_for(1, saim=False, background=store))

        def attend(queries, keys):
            q, k, v = (attn.head_to_batch_dim(x) for x in (attn.to_q(queries), attn.to_k(keys), attn.to_v(keys)))
            return attn.to_out[0](attn.batch_to_head_dim((q @ k.transpose(1, 2) * attn.scale).softmax(-1) @ v))

        compensated = phi[:1] + processor.bcm.gamma * processor.bcm.mlp(phi_b)
        assert torch.allclose(out[:1], attend(phi[:1], compensated), atol=1e-5)
        assert torch.allclose(out[1:], attend(phi[1:], phi[1:]), atol=1e-5)
        assert not torch.allclose(out[:1], attend(compensated, compensated), atol=1e-4)  # the queries stay phi's


def test_the_background_blacks_out_the_object(dual):
    import importlib

    module, _, _ = dual
    bcm = importlib.import_module(module.__package__ + ".bcm")
    image = np.full((1, 4, 4, 3), 200, np.uint8)
    objects = np.zeros((1, 4, 4), bool)
    objects[0, :2] = True
    background = bcm.background_image(image, objects)
    assert torch.all(background[0, :, :2] == -1) and torch.allclose(background[0, :, 2:], torch.tensor(200 / 127.5 - 1))


def test_the_part_image_has_a_mid_grey_background(dual):
    module, _, _ = dual
    image = np.full((1, 4, 4, 3), 200, np.uint8)
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 1:3, 1:3] = True
    part = module.part_image(image, mask)
    assert torch.all(part[0, :, ~torch.from_numpy(mask[0])] == 0)  # 0 in [-1, 1]: mid-grey
    assert torch.allclose(part[0, :, 1, 1], torch.full((3,), 200 / 127.5 - 1))


def test_the_stand_in_segments_the_part_and_flags_empty_ones(dual):
    from skimage.filters import threshold_otsu

    _, _, segment = dual
    rng = np.random.default_rng(0)
    part = np.clip(127.5 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    part[20:30, 10:40] = (40, 200, 90)
    part[50, 50] = (0, 0, 0)  # one stray pixel: below min_area, dropped
    part[5, 4:60] = (0, 0, 0)  # a line one pixel wide (56 px, above min_area): not salient, opened away
    found = segment.segment_part(part, min_area=0.002)
    truth = np.zeros((64, 64), bool)
    truth[20:30, 10:40] = True
    assert not found.empty and (found.mask == truth).all()
    assert segment.segment_part(part, min_area=0.002, opening=0).mask[5, 4:60].all()  # kept without the opening
    values = segment.distance_from_background(part)
    assert abs(segment.otsu_threshold(values) - threshold_otsu(values, nbins=256)) < 1.0
    noise_only = np.clip(127.5 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    empty = segment.segment_part(noise_only)
    assert empty.empty and not empty.mask.any()  # min-max normalisation would have made it a full-frame mask
    shift = np.array([-40, -25, -15])  # a whole field off mid-grey (guidance's pull): still no object, the same one
    assert segment.segment_part(np.clip(noise_only + shift, 0, 255).astype(np.uint8)).empty
    shifted = np.clip(part.astype(int) + shift, 0, 255).astype(np.uint8)
    shifted[20:30, 10:40] = (40, 200, 90)
    assert (segment.segment_part(shifted, min_area=0.002).mask == truth).all()


def test_u2net_segments_the_parts_when_its_weights_are_given_and_the_stand_in_otherwise(dual, monkeypatch, tmp_path):
    """`auto` uses U2-Net with the configured u2net.pth (a narrow one here: the real file is the user's) and records
    which weights; without the file the recorded stand-in; `u2net` without the file is an error naming it."""
    import importlib
    from functools import partial

    from harness.errors import MethodError

    module, _, segment = dual
    u2net = importlib.import_module(module.__package__ + ".u2net")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    config = {"empty_distance": 16, "min_area": 0.001, "segmenter": "auto", "u2net_weights": None}
    assert segment.make_segmenter(config).name == segment.STAND_IN
    with pytest.raises(MethodError, match="u2net.pth"):
        segment.make_segmenter({**config, "segmenter": "u2net"})
    torch.manual_seed(0)
    narrow = partial(u2net.U2Net, width=0.125)
    torch.save(narrow().state_dict(), tmp_path / "u2net.pth")
    monkeypatch.setattr(u2net, "U2Net", narrow)
    segmenter = segment.make_segmenter({**config, "u2net_weights": str(tmp_path / "u2net.pth")})
    assert segmenter.name == "u2net" and "config:u2net.pth sha256:" in segmenter.weights
    parts = np.full((2, 40, 40, 3), 128, np.uint8)
    parts[1, 10:20, 10:30] = (30, 200, 60)
    grey, drawn = segmenter.segment(parts)
    assert grey.empty and not grey.mask.any()  # near-uniform: flagged, not stretched by the min-max normalisation
    same = narrow()
    same.load_state_dict(torch.load(tmp_path / "u2net.pth"))
    assert np.array_equal(drawn.mask, u2net.part_mask(u2net.saliency(same, parts[1:])[0]))


def test_fit_saves_adapters_only_and_generate_makes_masked_pairs(dual, synth_root, pretrained_backbone, tmp_path):
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.generation import fit_method
    from harness.tasks import build_request, build_task

    folder, _ = pretrained_backbone
    split = make_split(read_category(synth_root, "washer", dataset="synthetic"))
    task = build_task(split, ["stain"], 64, seed=0)
    task.backbone = folder
    method = load_method("dualanodiff", "tiny", {"steps": 3, "inference_steps": 2})
    fit_method(method, task, tmp_path)
    saved = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    unet_size = sum(p.stat().st_size for p in (folder / "unet").rglob("*") if p.is_file())
    assert saved < unet_size / 2, (saved, unet_size)
    request = build_request(task, method, "stain", 3, seed=0)
    samples = list(method.generate(request, tmp_path))
    assert len(samples) == 3
    for sample in samples:
        assert sample.image.shape == (64, 64, 3) and sample.mask.shape == (64, 64) and sample.mask.dtype == bool
        assert sample.extra["segmenter"].startswith("stand-in") and isinstance(sample.extra["part_empty"], bool)
        assert sample.stand_in == "mask: the stand-in segmenter's (no U2-Net weights)"  # the leaderboard marks it
    again = list(load_method("dualanodiff", "tiny", {"steps": 3, "inference_steps": 2}).generate(request, tmp_path))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again))  # seeded


def test_bcm_fits_and_generates_on_normal_images(dual, synth_root, pretrained_backbone, tmp_path):
    from safetensors.torch import load_file

    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.errors import MethodError
    from harness.generation import fit_method
    from harness.tasks import build_request, build_task

    folder, _ = pretrained_backbone
    split = make_split(read_category(synth_root, "washer", dataset="synthetic"))
    task = build_task(split, ["stain"], 64, seed=0)
    task.backbone = folder
    settings = {"steps": 2, "inference_steps": 2, "bcm": {"enabled": True}}
    method = load_method("dualanodiff", "tiny", settings)
    assert method.needs == {"target_normal"} == load_method("dualanodiff", "tiny").needs  # on: the paper's
    assert load_method("dualanodiff", "tiny", {"bcm": {"enabled": False}}).needs == set()
    fit_method(method, task, tmp_path)
    module, _, _ = dual
    saved = load_file(str(tmp_path / module.DUAL_FILE))
    assert any(".processor.bcm." in key for key in saved)
    request = build_request(task, method, "stain", 2, seed=0)
    samples = list(method.generate(request, tmp_path))
    assert [s.extra["background"] for s in samples] == [t.normal.id for t in request.targets]
    assert all(s.normal_id is None for s in samples)  # not drawn on that image: no BG-PSNR against it
    plain = load_method("dualanodiff", "tiny", {"steps": 2, "inference_steps": 2, "bcm": {"enabled": False}})
    with pytest.raises(MethodError, match="BCM"):  # a request without normal images for a fit with BCM
        list(plain.generate(build_request(task, plain, "stain", 2, seed=0), tmp_path))


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_the_loss_is_eq_4_one_t_for_both_branches_independent_noises_the_backbones_target(dual, pretrained_backbone,
                                                                                          prediction):
    """`_loss` (through `dual_loss`) against Eq. 4 computed directly: both branches noised at one t with
    independent noises, each branch's prediction (one joint pass: SAIM couples them) against its own target in the
    backbone's parametrization (the noise, or v = sqrt(a_t) eps - sqrt(1 - a_t) z_0), the mean of the two terms.
    The same draws with one noise for both branches, or another t for the part, give another loss."""
    from harness.diffusion.finetune import LatentBatch

    _, saim, _ = dual
    method = load_method("dualanodiff", "tiny", {"bcm": {"enabled": False}})  # Eq. 4 alone (BCM: the tests above)
    torch.manual_seed(0)
    backbone, params = method._prepare(pretrained_backbone[0], method.config, train=True)
    backbone.scheduler = DDIMScheduler.from_config(backbone.scheduler.config, prediction_type=prediction)
    with torch.no_grad():
        for param in params:  # every adapter and SAIM non-zero, so each branch's path is its own
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
    prompts = {"whole": "a vfx with sks", "part": "sks"}
    channels = backbone.unet.config.in_channels
    z, z_part = torch.randn(3, channels, 8, 8), torch.randn(3, channels, 8, 8)
    batch = LatentBatch(latents=z, masks=torch.ones(3, 1, 8, 8), index=torch.arange(3), companions={"part": z_part})
    with torch.no_grad():
        loss = method._loss(backbone, prompts)(batch, torch.Generator().manual_seed(7))

        def direct(same_noise: bool = False, other_t: bool = False) -> torch.Tensor:
            generator = torch.Generator().manual_seed(7)  # the draws in the loss's order: eps, eps*, t
            eps = torch.randn(z.shape, generator=generator)
            eps_part = eps if same_noise else torch.randn(z.shape, generator=generator)
            t = torch.randint(0, 1000, (3,), generator=generator)
            t_part = (t + 300) % 1000 if other_t else t
            alpha = backbone.scheduler.alphas_cumprod

            def noised(z_0, noise, steps):
                a = alpha[steps].view(-1, 1, 1, 1)
                target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z_0
                return a.sqrt() * z_0 + (1 - a).sqrt() * noise, target

            (z_t, target), (z_part_t, target_part) = noised(z, eps, t), noised(z_part, eps_part, t_part)
            text = backbone.encode_text([prompts["whole"], prompts["part"]]).repeat(3, 1, 1)
            out = backbone.unet(torch.stack([z_t, z_part_t], 1).flatten(0, 1), torch.stack([t, t_part], 1).flatten(),
                                encoder_hidden_states=text,
                                cross_attention_kwargs={"context": saim.context_for(3, True)}).sample
            return (F.mse_loss(out[0::2], target) + F.mse_loss(out[1::2], target_part)) / 2

        assert torch.allclose(loss, direct(), rtol=1e-5, atol=1e-7), (float(loss), float(direct()))
        assert not torch.allclose(loss, direct(same_noise=True), rtol=1e-3)
        assert not torch.allclose(loss, direct(other_t=True), rtol=1e-3)


def test_class_word_prompts_are_filled_in_and_a_bad_placeholder_is_named(dual):
    from harness.errors import MethodError

    module, _, _ = dual
    filled = module.fill_prompts({"whole": "a {category} with {defect}", "part": "{defect}"}, "metal_nut", "color")
    assert filled == {"whole": "a metal nut with color", "part": "color"}
    assert module.fill_prompts({"whole": "a vfx with sks", "part": "sks"}, "x", "y")["whole"] == "a vfx with sks"
    with pytest.raises(MethodError, match="category"):
        load_method("dualanodiff", "tiny", {"prompts": {"whole": "a {categry}", "part": "sks"}})


def test_the_ablation_suite_has_one_column_per_switch():
    from harness.runner.suite import load_suite

    suite = load_suite("ablation-dualanodiff")
    configs = [load_method(m.method, suite.profile, m.config).config for m in suite.methods]
    assert len({m.label for m in suite.methods}) == 5 and all(m.method == "dualanodiff" for m in suite.methods)
    base = configs[0]
    changed = [{k for k in base if c[k] != base[k]} for c in configs[1:]]
    assert changed == [{"saim"}, {"text_lora"}, {"prompts"}, {"bcm"}]


def test_bcm_guidance_gives_the_unconditional_whole_images_a_grey_background(dual, synth_root, pretrained_backbone,
                                                                             monkeypatch):
    """The guided batch is [uncond pairs; cond pairs]: the background pass gets [grey x B; the targets' backgrounds x
    B] with the whole image's [empty; own] prompt, the same noise for both halves."""
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.diffusion.backbone import load_frozen
    from harness.diffusion.latents import encode, resize_images, resize_masks
    from harness.tasks import build_request, build_task

    module, _, _ = dual
    bcm = importlib.import_module(module.__package__ + ".bcm")
    backbone = load_frozen(pretrained_backbone[0], torch.device("cpu"))
    split = make_split(read_category(synth_root, "washer", dataset="synthetic"))
    task = build_task(split, ["stain"], 64, seed=0)
    method = load_method("dualanodiff", "tiny", {"bcm": {"enabled": True}})
    targets = build_request(task, method, "stain", 2, seed=0).targets
    noise = torch.randn(2, *encode(backbone, np.zeros((1, 64, 64, 3), np.uint8)).shape[1:])
    with torch.no_grad():
        latents, noises = method._backgrounds(backbone, targets, 64, noise)
        grey = encode(backbone, torch.zeros(1, 3, 64, 64))
        own = encode(backbone, bcm.background_image(resize_images(np.stack([t.normal.image for t in targets]), 64),
                                                    resize_masks(np.stack([t.normal_foreground for t in targets]), 64)))
    assert torch.allclose(latents[:2], grey.expand(2, -1, -1, -1), atol=1e-6)
    assert torch.allclose(latents[2:], own, atol=1e-6) and torch.equal(noises, torch.cat([noise, noise]))
    seen = []
    namespace = type(method)._sample.__globals__  # the method's own module (discovery may have loaded it anew)
    real = namespace["_background_features"]
    monkeypatch.setitem(namespace, "_background_features",
                        lambda unet, z_b, t, text: seen.append(text) or real(unet, z_b, t, text))
    namespace["saim"].install(backbone.unet, rank=2, bcm_hidden=8)
    condition = torch.randn(4, *backbone.encode_text([""]).shape[1:])
    method.config["inference_steps"] = 1
    with torch.no_grad():
        method._sample(backbone, condition, torch.randn(4, *noise.shape[1:]), True, (latents, noises))
    assert torch.equal(seen[0], torch.cat([condition[0:1].expand(2, -1, -1), condition[2:3].expand(2, -1, -1)]))


def test_bad_settings_are_named():
    from harness.errors import MethodError

    with pytest.raises(MethodError, match="scheduler"):
        load_method("dualanodiff", "tiny", {"scheduler": "NoSuchScheduler"})
    with pytest.raises(MethodError, match="saim_init"):
        load_method("dualanodiff", "tiny", {"saim_init": "ones"})


def test_the_finished_method_is_in_methods_all():
    from harness.runner.suite import load_suite

    assert not get_method_info("dualanodiff").cls.in_progress
    assert "dualanodiff" in {m.method for m in load_suite("smoke").methods}
    assert "dualanodiff" in {m.method for m in load_suite("demo").methods}


# ---- the paper's claims after fitting, each with broken variants that must fail it ------------------------------
# weave/hole at 64 px on the shipped backbone, the tiny profile's settings (200 steps, BCM on, DDIM 25, guidance 2.5);
# about 100 s on 2 threads: `make test-slow` (CI's second step). Measured (8 samples, seed 3):
#                            non-empty  shape  agreement
#   working                  1.00       0.71   0.88
#   no fine-tuning           1.00       2.33   0.55     (no hole drawn; the masks are the untuned part's blotches)
#   no SAIM                  1.00       0.74   0.57     (holes in both branches, each in its own place)
#   parts of another sample  1.00       0.71   0.52
#   prompts swapped          1.00       2.29   0.55     (the part's speckle covers up to 16 % of an image)
# The bounds sit between the working method and the nearest broken variant on each claim.

CLAIM_SAMPLES = 8


@pytest.fixture(scope="module")
def claim_variants(dual, synth_root, pretrained_backbone, tmp_path_factory):
    """The working method and its broken variants on weave/hole, with what the claims read: the share of non-empty
    masks, the masks' shape distance from the training masks (claims.shape_distance, non-empty masks only) and the
    whole images' agreement with their masks (claims.mask_agreement)."""
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.generation import fit_method
    from harness.tasks import build_request, build_task

    from tests.claims import mask_agreement, shape_distance

    task = build_task(make_split(read_category(synth_root, "weave", dataset="synthetic")), ["hole"], 64, seed=0)
    task.backbone = pretrained_backbone[0]
    normals = np.stack([n.image for n in task.normals])
    training_masks = [a.mask for a in task.anomalies]

    def fitted(name, **settings):
        workdir = tmp_path_factory.mktemp(name)
        fit_method(load_method("dualanodiff", "tiny", settings), task, workdir)
        return workdir

    def measured(samples, masks=None):
        masks = [s.mask for s in samples] if masks is None else masks
        drawn = [m for m in masks if m.any()]
        return {"non_empty": len(drawn) / len(masks), "largest": max(float(m.mean()) for m in masks),
                "shape": shape_distance(drawn, training_masks) if drawn else float("inf"),
                "agreement": mask_agreement([s.image for s in samples], masks, normals),
                "samples": samples}

    def generated(workdir, **settings):
        method = load_method("dualanodiff", "tiny", settings)
        return list(method.generate(build_request(task, method, "hole", CLAIM_SAMPLES, seed=3), workdir))

    working = fitted("working")
    out = {"working": measured(generated(working)),
           "no fine-tuning": measured(generated(fitted("untuned", steps=0))),
           "no SAIM": measured(generated(fitted("no_saim", saim=False), saim=False))}
    samples = out["working"]["samples"]
    out["parts of another sample"] = measured(samples, [s.mask for s in samples[1:] + samples[:1]])
    mp = pytest.MonkeyPatch()
    try:  # the branches' prompts swapped at sampling: the whole image drawn from "sks", the part from the sentence
        original = type(load_method("dualanodiff", "tiny"))._condition
        mp.setattr(type(load_method("dualanodiff", "tiny")), "_condition",
                   lambda self, backbone, prompts: original(self, backbone, {"whole": prompts["part"],
                                                                             "part": prompts["whole"]}))
        out["prompts swapped"] = measured(generated(working))
    finally:
        mp.undo()
    for name, m in out.items():  # (-s shows them)
        print(f"{name:24s} non-empty {m['non_empty']:.2f}  largest {m['largest']:.2f}  shape {m['shape']:.3f}  agreement {m['agreement']:.3f}")
    return out


def test_the_agreement_measure_sees_a_drawn_defect_under_its_mask_only():
    """The instrument on a known answer: textured normal images, one with a dark blob. Its own mask scores near 1, a
    mask elsewhere near 0.5 or below, and a blob-free image near 0.5 whatever the mask."""
    from tests.claims import mask_agreement

    rng = np.random.default_rng(0)
    normals = np.clip(rng.normal(120, 12, (4, 64, 64, 3)), 0, 255)
    image = np.clip(rng.normal(120, 12, (64, 64, 3)), 0, 255)
    yy, xx = np.mgrid[:64, :64]
    blob, elsewhere = (yy - 20) ** 2 + (xx - 20) ** 2 < 36, (yy - 44) ** 2 + (xx - 44) ** 2 < 36
    defective = image.copy()
    defective[blob] = 30
    assert mask_agreement([defective], [blob], normals) > 0.95
    assert mask_agreement([defective], [elsewhere], normals) < 0.6
    assert 0.35 < mask_agreement([image], [blob], normals) < 0.65
    assert mask_agreement([defective], [np.zeros((64, 64), bool)], normals) == 0.5  # nothing to compare


CLAIMS = {
    "part masks like the training masks": lambda m: (m["non_empty"] >= 0.8 and m["shape"] <= 1.6
                                                     and m["largest"] <= 0.5),
    "whole image and part agree": lambda m: m["agreement"] >= 0.72,
}


# Negative controls: each breaks the mechanism a claim rests on (the fit, the branches' prompts, SAIM's interaction,
# the pairing of a whole image with its own part) and must fail that claim.
test_the_working_method_holds_every_claim, test_each_control_fails_its_claims = claim_tests(
    CLAIMS, "claim_variants", [
    ("no fine-tuning", ["part masks like the training masks", "whole image and part agree"]),
    ("prompts swapped", ["part masks like the training masks"]),
    ("no SAIM", ["whole image and part agree"]),
    ("parts of another sample", ["whole image and part agree"]),
])


# ---- the `paper` profile rehearsed end to end on a model in SD 1.5's layout (tests/rehearsal.py) ------------------

def test_the_paper_profile_fits_and_generates_on_sd15s_layout(dual, synth_root, sd15_rehearsal, tmp_path,
                                                              monkeypatch):
    """Every branch of the paper configuration (BCM, SAIM, the text LoRA, PNDM, U2-Net masks: a narrow random
    U2-Net with the real one's layer names) once, with only the step counts cut: 512-px content, what trains and
    what stays frozen, counted, and the adapters' saved size against their ranks."""
    from functools import partial

    from safetensors.torch import load_file

    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.diffusion import ddim
    from harness.diffusion.backbone import load_frozen
    from harness.generation import fit_method
    from harness.profiles import get_profile
    from harness.tasks import build_request, build_task

    module, saim, segment = dual
    u2net = importlib.import_module(module.__package__ + ".u2net")
    narrow = partial(u2net.U2Net, width=0.125)
    torch.save(narrow().state_dict(), tmp_path / "u2net.pth")
    monkeypatch.setattr(u2net, "U2Net", narrow)
    method = load_method("dualanodiff", "paper", {"steps": 2, "inference_steps": 2,
                                                  "mask": {"segmenter": "u2net", "u2net_weights": str(tmp_path / "u2net.pth")}})
    config = method.config
    assert (config["lora"]["rank"], config["text_lora"]["rank"], config["bcm"]["enabled"], config["bcm"]["hidden"],
            config["saim"], config["scheduler"], config["guidance_scale"], config["learning_rate"],
            config["batch_size"]) == (32, 32, True, 320, True, "PNDMScheduler", 2.5, 2e-5, 4)
    assert config["prompts"] == {"whole": "a vfx with sks", "part": "sks"}
    size = method.working_resolution(get_profile("paper").resolution)
    assert size == 512 and get_profile("paper").resolution == 256
    task = build_task(make_split(read_category(synth_root, "washer", dataset="synthetic")), ["stain"], size, seed=0)
    task.backbone = sd15_rehearsal
    work = tmp_path / "fit"
    fit_method(method, task, work)

    record = json.loads((work / module.MODEL_FILE).read_text())
    backbone = load_frozen(sd15_rehearsal, torch.device("cpu"))
    frozen = sum(p.numel() for m in (backbone.unet, backbone.vae, backbone.text_encoder) for p in m.parameters())
    saim.install(backbone.unet, 32, None, False, 320)
    dual_parameters = sum(p.numel() for n, p in backbone.unet.named_parameters() if ".processor." in n)
    saved = load_file(str(work / module.DUAL_FILE))
    assert sum(t.numel() for t in saved.values()) == dual_parameters  # branch LoRAs, SAIM, BCM: all of them, only
    text_lora = record["trained_parameters"] - dual_parameters
    layers = backbone.text_encoder.config.num_hidden_layers
    width = backbone.text_encoder.config.hidden_size
    assert text_lora == layers * 4 * 2 * 32 * width  # q, k, v, out of every layer: A (32 x w) and B (w x 32)
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in backbone.unet.modules() if isinstance(m, Attention)]
    expected_lora = sum(2 * 32 * (layer.in_features + layer.out_features) for attn in attentions
                        for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]))  # 2 branches, rank 32
    assert sum(t.numel() for n, t in saved.items() if ".lora." in n) == expected_lora
    assert all(t.shape[:2] == (2, 32) for n, t in saved.items() if n.endswith(".down"))
    assert all(t.shape[0] == 2 and t.shape[2] == 32 for n, t in saved.items() if n.endswith(".up"))
    assert (work / module.DUAL_FILE).stat().st_size < 4 * dual_parameters + 200_000  # float32 tensors and a header
    assert record["resolution"] == 512 and len(attentions) == 32  # SD 1.5: 16 transformer blocks, 2 attentions each
    rebuilt, trained = method._prepare(sd15_rehearsal, config, train=True)  # what a fit trains, and nothing else
    trainable = [p for m in (rebuilt.unet, rebuilt.vae, rebuilt.text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in trained}
    assert sum(p.numel() for p in trained) == record["trained_parameters"]
    assert sum(p.numel() for m in (rebuilt.unet, rebuilt.vae, rebuilt.text_encoder) for p in m.parameters()
               if not p.requires_grad) == frozen  # the whole SD 1.5 layout stays frozen
    print(f"rehearsal: frozen {frozen:,} parameters, trained {record['trained_parameters']:,} "
          f"(dual {dual_parameters:,}, text LoRA {text_lora:,}); saved {(work / module.DUAL_FILE).stat().st_size:,} B")

    schedulers = []
    real = ddim.sample_with
    monkeypatch.setattr(ddim, "sample_with", lambda scheduler, *a, **k: schedulers.append(scheduler) or
                        real(scheduler, *a, **k))
    request = build_request(task, method, "stain", 2, seed=0)
    samples = list(method.generate(request, work))
    assert [type(s).__name__ for s in schedulers] == ["PNDMScheduler"]
    assert len(samples) == 2 and all(s.image.shape == (512, 512, 3) and s.mask.shape == (512, 512) for s in samples)
    assert all(s.extra["segmenter"] == "u2net" and s.stand_in is None for s in samples)
    assert [s.extra["background"] for s in samples] == [t.normal.id for t in request.targets]  # BCM's background
