"""The shared diffusion toolkit (harness/diffusion/): LoRA adapters, attention processors, placeholders and the
fine-tuning loop, each on small tensors against a direct computation or the library it wraps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from harness.diffusion import lora


def small_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def small_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8)).eval()


def _train(model, params, run, steps: int = 5) -> None:
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        loss = run(model).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def test_unet_lora_trains_alone_and_saves_only_the_adapter(tmp_path):
    unet, fresh = small_unet(), small_unet()
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    run = lambda m: m(z, 10, encoder_hidden_states=c).sample  # noqa: E731
    with torch.no_grad():
        before = run(unet)
    settings = lora.LoraSettings(rank=4)
    params = lora.add_lora(unet, settings)
    with torch.no_grad():
        assert torch.equal(run(unet), before)  # B = 0: the model is unchanged until trained
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    _train(unet, params, run)
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if "lora_" not in n)  # base frozen
    with torch.no_grad():
        trained = run(unet)
    assert not torch.allclose(trained, before)
    folder = lora.save_lora(unet, tmp_path / "adapter", settings)
    adapter_bytes = (folder / lora.WEIGHTS_FILE).stat().st_size
    full_bytes = sum(p.numel() * p.element_size() for p in fresh.parameters())
    assert adapter_bytes < 0.1 * full_bytes
    assert lora.load_lora(fresh, folder) == settings
    with torch.no_grad():
        assert torch.allclose(run(fresh), trained, atol=1e-6)


def test_a_seeded_lora_starts_from_the_same_weights_whatever_ran_before():
    settings = lora.LoraSettings(rank=4)
    first, second, unseeded = small_unet(), small_unet(), small_unet()
    lora.add_lora(first, settings, seed=7)
    torch.randn(1000)  # the global generator moves on: a seeded adapter must not notice
    lora.add_lora(second, settings, seed=7)
    lora.add_lora(unseeded, settings)
    a, b, c = (lora.lora_state(m) for m in (first, second, unseeded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_text_encoder_lora_round_trip(tmp_path):
    encoder, fresh = small_text_encoder(), small_text_encoder()
    ids = torch.randint(0, 50, (2, 8))
    run = lambda m: m(ids)[0]  # noqa: E731
    settings = lora.LoraSettings(rank=2, targets=lora.TEXT_TARGETS)
    params = lora.add_lora(encoder, settings, name="text")
    _train(encoder, params, run)
    lora.save_lora(encoder, tmp_path / "text", settings, name="text")
    lora.load_lora(fresh, tmp_path / "text", name="text")
    with torch.no_grad():
        assert torch.allclose(run(fresh), run(encoder), atol=1e-6)


def test_lora_targets_that_match_nothing_are_an_error():
    import pytest

    with pytest.raises(ValueError):
        lora.add_lora(small_text_encoder(), lora.LoraSettings(targets=("to_nowhere",)))


# ---- attention processors with per-call inputs -------------------------------------------------------------------

from harness.diffusion import processors as proc  # noqa: E402


def _inputs(seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)


def test_a_layer_processor_equals_diffusers_attention_with_no_input_for_its_behaviours():
    unet = small_unet()
    z, c = _inputs()
    every = proc.each_layer(proc.Record, proc.Reweight)
    with torch.no_grad():
        expected = unet(z, 10, encoder_hidden_states=c).sample
        with proc.installed(unet):
            plain = unet(z, 10, encoder_hidden_states=c).sample
        with proc.installed(unet, every):
            with_context = unet(z, 10, encoder_hidden_states=c,
                                cross_attention_kwargs={"context": proc.AttentionContext()}).sample
            # an input for a behaviour the layers do not have changes nothing either
            other = unet(z, 10, encoder_hidden_states=c, cross_attention_kwargs={"context": proc.AttentionContext(
                proc.SampleBranches(torch.tensor([0, 1])))}).sample
    assert torch.allclose(plain, expected, atol=1e-5) and torch.allclose(with_context, expected, atol=1e-5)
    assert torch.allclose(other, expected, atol=1e-5)


def test_a_context_holds_one_input_per_type_and_layers_one_behaviour_per_slot():
    recorder = proc.Recorder(tokens=(1,))
    context = proc.AttentionContext(recorder, None)
    assert context.get(proc.Recorder) is recorder and context.get(proc.TokenReweight) is None
    with pytest.raises(ValueError, match="two Recorder"):
        proc.AttentionContext(recorder, proc.Recorder(tokens=(2,)))
    with pytest.raises(ValueError, match="slot"):
        proc.LayerProcessor("layer", [proc.Record(), proc.Record()])

    class Rule(proc.Behaviour):
        slot = "rule"

        def attend(self, attend, query, source, call):
            return None

    class Other(Rule):
        slot = "other"

    with pytest.raises(ValueError, match="replace the attention"):
        proc.LayerProcessor("layer", [Rule(), Other()])

    class Blind(proc.Behaviour):  # changes the logits, never asks for the map: the fused kernel would skip it
        slot = "blind"

        def logits(self, logits, call):
            return logits * 2

    with pytest.raises(ValueError, match="needs_map"):
        proc.LayerProcessor("layer", [Blind()])


def _cross_layer(unet):
    name, module = next((n, m) for n, m in unet.named_modules() if n.endswith("attn2"))
    return name, module


def _processor(name, *behaviours):
    return proc.LayerProcessor(name, list(behaviours))


def test_recording_returns_the_softmax_of_a_token_averaged_over_heads():
    unet = small_unet()
    name, attn = _cross_layer(unet)
    hidden = torch.randn(2, 16, attn.to_q.in_features)  # a 4 x 4 map
    c = torch.randn(2, 3, 16)
    recorder = proc.Recorder(tokens=(1,))
    processor = _processor(name, proc.Record())
    with torch.no_grad():
        processor(attn, hidden, c, context=proc.AttentionContext(recorder))
        q, k = attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(c))
        direct = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)[..., 1].reshape(2, attn.heads, 16).mean(1)
    assert torch.allclose(recorder.maps[name][0], direct.reshape(2, 1, 4, 4), atol=1e-6)
    assert recorder.mean(8).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="no attention map"):  # a layer without Record keeps nothing
        recorder = proc.Recorder(tokens=(1,))
        _processor(name)(attn, hidden, c, context=proc.AttentionContext(recorder))
        recorder.mean(8)


def test_reweighting_adds_a_spatial_map_to_the_logits_of_a_token_range():
    unet = small_unet()
    name, attn = _cross_layer(unet)
    hidden, c = torch.randn(1, 16, attn.to_q.in_features), torch.randn(1, 3, 16)
    weights = torch.zeros(1, 1, 4, 4)
    weights[..., :2, :] = 1.0
    reweight = proc.TokenReweight(start=1, stop=3, weights=weights, scale=2.0)
    processor = _processor(name, proc.Reweight())
    with torch.no_grad():
        out = processor(attn, hidden, c, context=proc.AttentionContext(reweight))
        q, k, v = (attn.head_to_batch_dim(f(x)) for f, x in ((attn.to_q, hidden), (attn.to_k, c), (attn.to_v, c)))
        logits = q @ k.transpose(1, 2) * attn.scale
        logits[:, :, 1:3] += 2.0 * weights.flatten(1)[:, :, None]
        direct = attn.to_out[0](attn.batch_to_head_dim(logits.softmax(-1) @ v))
    assert torch.allclose(out, direct, atol=1e-5)


def test_reweighting_can_multiply_the_logits_of_a_token_range():
    unet = small_unet()
    name, attn = _cross_layer(unet)
    hidden, c = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 3, 16)
    weights = 1 + torch.rand(2, 1, 4, 4) * 0.5
    reweight = proc.TokenReweight(start=1, stop=3, weights=weights, multiply=True)
    processor = _processor(name, proc.Reweight())
    with torch.no_grad():
        out = processor(attn, hidden, c, context=proc.AttentionContext(reweight))
        q, k, v = (attn.head_to_batch_dim(f(x)) for f, x in ((attn.to_q, hidden), (attn.to_k, c), (attn.to_v, c)))
        logits = q @ k.transpose(1, 2) * attn.scale  # (batch * heads, positions, tokens), sample-major
        per_row = weights.flatten(1).repeat_interleave(attn.heads, 0)
        logits[:, :, 1:3] *= per_row[:, :, None]
        direct = attn.to_out[0](attn.batch_to_head_dim(logits.softmax(-1) @ v))
        # per-sample tokens: the second sample's re-weighted token is 0, not 1 and 2
        columns = torch.tensor([[False, True, True], [True, False, False]])
        per_sample = processor(attn, hidden, c, context=proc.AttentionContext(proc.TokenReweight(
            start=0, stop=0, weights=weights, multiply=True, columns=columns)))
        logits = q @ k.transpose(1, 2) * attn.scale
        heads = attn.heads
        logits[:heads, :, 1:3] *= per_row[:heads, :, None]
        logits[heads:, :, 0:1] *= per_row[heads:, :, None]
        direct_per_sample = attn.to_out[0](attn.batch_to_head_dim(logits.softmax(-1) @ v))
    assert torch.allclose(out, direct, atol=1e-5)
    assert torch.allclose(per_sample, direct_per_sample, atol=1e-5)


def test_per_branch_lora_trains_two_adapters_in_one_batch(tmp_path):
    unet = small_unet()
    z, c = _inputs()
    proc.install(unet, lambda name, attn: [proc.BranchLoRA(attn, branches=2, rank=2)])
    unet.requires_grad_(False)
    params = proc.branch_lora_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    branch = torch.tensor([0, 1])
    run = lambda b, zz=z, cc=c: unet(zz, 10, encoder_hidden_states=cc, cross_attention_kwargs={  # noqa: E731
        "context": proc.AttentionContext(proc.SampleBranches(b))}).sample
    loss = (run(branch) - torch.stack([torch.ones_like(z[0]), -torch.ones_like(z[0])])).pow(2).mean()
    loss.backward()
    ups = [p for n, p in unet.named_parameters() if n.endswith(".lora.q.up")]
    assert all(p.grad is not None and p.grad[0].abs().sum() > 0 and p.grad[1].abs().sum() > 0 for p in ups)
    torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad():
        mixed = run(branch)
        only_0 = run(torch.tensor([0, 0]))
        only_1 = run(torch.tensor([1, 1]))
        with pytest.raises(ValueError, match="SampleBranches"):
            unet(z, 10, encoder_hidden_states=c)
    assert torch.allclose(mixed[0], only_0[0], atol=1e-5) and torch.allclose(mixed[1], only_1[1], atol=1e-5)
    assert not torch.allclose(only_0[0], only_1[0], atol=1e-4)  # the two adapters differ
    state = proc.branch_lora_state(unet)
    assert state and all(".processor.lora." in k for k in state)


# ---- placeholders (textual inversion) ------------------------------------------------------------------------------


def test_placeholders_inject_vectors_per_call_and_train_them():
    from harness.diffusion.backbone import build_tiny
    from harness.diffusion.placeholders import Placeholders, TrainedVectors

    tiny = build_tiny(["weave"], resolution=32)
    encoder, tokenizer = tiny.text_encoder.eval(), tiny.tokenizer
    holders = Placeholders(tokenizer, ["sks", "ktn"])
    prompts = ["a photo of sks weave", "a photo of ktn weave"]
    table = encoder.get_input_embeddings().weight.detach()
    with torch.no_grad():
        plain = tiny.encode_text(prompts)
        same = holders.encode(encoder, prompts, {"sks": table[holders.ids["sks"]]})
        other = holders.encode(encoder, prompts, {"sks": torch.stack([table[5], table[6]])})  # one per prompt
        after = tiny.encode_text(prompts)
    assert torch.allclose(same, plain, atol=1e-6) and torch.equal(after, plain)  # the hook is gone afterwards
    assert not torch.allclose(other[0], plain[0], atol=1e-4)
    assert torch.allclose(other[1], plain[1], atol=1e-6)  # no sks in the second prompt
    # textual inversion: a trained vector makes "sks" mean what a target says
    vectors = TrainedVectors(encoder, tokenizer, {"sks": "weave"})
    target = tiny.encode_text(["a photo of a washer"])[:, :6].detach()
    optimiser = torch.optim.Adam(vectors.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = (holders.encode(encoder, ["a photo of sks"], vectors.as_dict())[:, :6] - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    import pytest

    with pytest.raises(ValueError, match="one known token"):
        Placeholders(tokenizer, ["notaword"])


def test_a_placeholder_written_k_times_takes_k_vectors_in_order():
    import pytest

    from harness.diffusion.backbone import build_tiny
    from harness.diffusion.placeholders import Placeholders, repeated

    tiny = build_tiny(["weave"], resolution=32)
    encoder, tokenizer = tiny.text_encoder.eval(), tiny.tokenizer
    holders = Placeholders(tokenizer, ["sks"])
    prompt = repeated("a photo of sks", "sks", 3)
    assert prompt == "a photo of sks sks sks"
    table = encoder.get_input_embeddings().weight.detach()
    words = [["weave", "a", "photo"], ["of", "weave", "a"]]
    vectors = torch.stack([torch.stack([table[tokenizer(w, add_special_tokens=False).input_ids[0]] for w in row])
                           for row in words])  # (2 prompts, 3 vectors, dim)
    with torch.no_grad():
        injected = holders.encode(encoder, [prompt, prompt], {"sks": vectors})
        direct = tiny.encode_text(["a photo of weave a photo", "a photo of of weave a"])
    assert torch.allclose(injected, direct, atol=1e-6)  # the same as writing those words at those positions
    with pytest.raises(ValueError, match="occurs"):
        holders.encode(encoder, ["a photo of sks sks"], {"sks": vectors[:1]})
    with pytest.raises(ValueError, match="exactly once"):
        repeated("a photo", "sks", 2)


# ---- the fine-tuning loop -----------------------------------------------------------------------------------------


def _toy_data() -> "object":
    from harness.diffusion.finetune import LatentData

    torch.manual_seed(0)
    return LatentData(torch.randn(6, 2, 4, 4), torch.ones(6, 1, 4, 4), torch.arange(6))


def _toy_loss(weight):
    def loss(batch, generator):
        noise = torch.randn(batch.latents.shape, generator=generator)
        return (weight - 1.0 - 0.1 * batch.latents.mean() + 0.01 * noise.mean()).pow(2).sum()
    return loss


def test_finetune_lowers_the_loss_is_seeded_and_resumes_where_it_stopped(tmp_path):
    from harness.diffusion.finetune import CHECKPOINT, FinetuneConfig, finetune

    config = FinetuneConfig(steps=40, batch_size=3, learning_rate=0.05, checkpoint_every=10, seed=3)
    data = _toy_data()
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    history = finetune([a], data, _toy_loss(a), config, tmp_path / "a")
    finetune([b], data, _toy_loss(b), config, tmp_path / "b")
    assert history[-1] < history[0] and torch.equal(a, b)  # learns, and the same seed gives the same fit

    class Killed(Exception):
        pass

    c = torch.nn.Parameter(torch.zeros(1))
    calls = {"n": 0}
    inner = _toy_loss(c)

    def dies_at_step_25(batch, generator):
        calls["n"] += 1
        if calls["n"] == 26:
            raise Killed
        return inner(batch, generator)

    import pytest

    with pytest.raises(Killed):
        finetune([c], data, dies_at_step_25, config, tmp_path / "c")
    assert (tmp_path / "c" / CHECKPOINT).is_file()
    resumed = torch.nn.Parameter(torch.zeros(1))
    finetune([resumed], data, _toy_loss(resumed), config, tmp_path / "c")  # from step 20, not 0
    assert torch.allclose(resumed, a, atol=1e-7)
    assert not (tmp_path / "c" / CHECKPOINT).exists()  # a finished fit leaves no checkpoint behind


def test_a_resumed_fit_keeps_the_buffers_the_training_changes(tmp_path):
    """BatchNorm's running statistics are not parameters: a fit killed and resumed must restore them too."""
    import pytest

    from harness.diffusion.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(steps=20, batch_size=3, learning_rate=0.05, checkpoint_every=10, seed=3)
    data = _toy_data()

    def run(folder, die_at=None):
        torch.manual_seed(0)
        norm = torch.nn.BatchNorm1d(1)
        calls = {"n": 0}

        def loss(batch, generator):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise KeyboardInterrupt
            return norm(batch.latents.flatten(1)[:, :1]).pow(2).mean()

        finetune(list(norm.parameters()), data, loss, config, folder, buffers=list(norm.buffers()))
        return norm

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", die_at=16)
    resumed = run(tmp_path / "killed")
    assert torch.allclose(resumed.running_mean, whole.running_mean) and resumed.num_batches_tracked == 20


def test_finetune_clips_gradients_and_encodes_flipped_pairs():
    from harness.diffusion.backbone import build_tiny
    from harness.diffusion.finetune import FinetuneConfig, LatentData, finetune

    p = torch.nn.Parameter(torch.zeros(3))
    data = _toy_data()
    finetune([p], data, lambda batch, g: 1e6 * p.sum(), FinetuneConfig(steps=1, learning_rate=1.0, weight_decay=0,
                                                                         grad_clip=1.0, checkpoint_every=0))
    assert p.abs().max() <= 1.0 + 1e-5  # Adam's first step is lr * sign; the clipped gradient kept its direction
    tiny = build_tiny(["weave"], resolution=32)
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(np.uint8)
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 4:12, 2:10] = True  # off-centre, so flips move it
    encoded = LatentData.encode(tiny, images, masks)
    assert len(encoded) == 6 and encoded.index.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(encoded.masks[2], encoded.masks[0].flip(-1)) and torch.equal(encoded.masks[4], encoded.masks[0].flip(-2))


# ---- a diffusion method is a directory ------------------------------------------------------------------------------


def test_the_example_diffusion_method_runs_in_a_suite(tmp_path, monkeypatch, isolated_cache):
    """tests/methods/lora_inpaint: LoRA + DreamBooth prompt + blended sampling, from harness/diffusion alone, through
    the whole job graph (backbone, fit, generate, score); its fit keeps the adapter, not a UNet."""
    import json
    from pathlib import Path

    import yaml

    from harness.results import run_records
    from harness.runner.run import run_suite
    from harness.runner.suite import parse_suite

    monkeypatch.setenv("DEFECTBENCH_METHODS_PATH", str(Path(__file__).parent / "methods"))
    raw = yaml.safe_load((Path(__file__).parent / "suites" / "faults.yaml").read_text())
    raw.update(name="example", metrics=["bg_psnr", "mask_iou"], backbone={"unet_steps": 3, "batch_size": 2},
               methods=[{"method": "lora_inpaint", "config": {"steps": 3, "inference_steps": 2}}],
               generate={"n": 2})
    result = run_suite(parse_suite(raw, tmp_path / "example.yaml"), executor="serial", results=tmp_path,
                       progress=False)
    assert set(result.states.values()) == {"done"}, result.states
    fits = [p.parent for p in result.store.run_dir.glob("jobs/*/work/fit.json")]
    assert len(fits) == 3
    for work in fits:
        assert (work / "lora" / "adapter_model.safetensors").is_file() and not list(work.rglob("*unet*"))
        assert json.loads((work / "fit.json").read_text())["prompt"].startswith("a photo of sks defect")
    records = run_records(result.store)
    assert set(records["metric"]) == {"bg_psnr", "mask_iou"} and records["value"].notna().all()


# ---- backbone: latents of every diffusers autoencoder ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "tiny", "dc"])
def test_unscaled_latents_reads_each_autoencoders_output(kind):
    """SD's AutoencoderKL gives a posterior (its mean is the latent), AutoencoderTiny `latents`, AutoencoderDC
    `latent`: one reader returns what each model's own encoder output holds."""
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny

    from harness.diffusion.backbone import unscaled_latents

    torch.manual_seed(0)
    if kind == "kl":
        vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        expected = lambda out: out.latent_dist.mean  # noqa: E731
    elif kind == "tiny":
        vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
        expected = lambda out: out.latents  # noqa: E731
    else:
        vae = AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock",
                            decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8),
                            decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1),
                            decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                            decoder_qkv_multiscales=((), ()))
        expected = lambda out: out.latent  # noqa: E731
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(unscaled_latents(vae.eval(), images), expected(vae.encode(images)))


def test_installed_processors_live_where_their_layers_are():
    """A processor's own parameters (per-branch LoRA) follow the UNet's device: on a GPU they must not stay on the
    CPU (the meta device stands in for a GPU here)."""
    unet = small_unet().to("meta")
    proc.install(unet, lambda name, attn: [proc.BranchLoRA(attn, branches=2, rank=2)])
    devices = {p.device.type for n, p in unet.named_parameters() if ".processor." in n}
    assert devices == {"meta"}


def test_paired_images_are_encoded_with_the_same_flips():
    from harness.diffusion.finetune import LatentData
    from harness.diffusion.latents import to_tensor

    class Identity:  # an autoencoder whose latents are the image itself: the pairing is visible directly
        device = torch.device("cpu")
        latent_scale = 1.0

        @staticmethod
        def encode_images(images):
            return images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    masks = rng.random((2, 8, 8)) > 0.5
    data = LatentData.encode(Identity(), images, masks, companions={
        "negative": lambda i, m: -to_tensor(i), "masked": lambda i, m: to_tensor(i) * torch.from_numpy(m)[:, None]})
    assert torch.equal(data.companions["negative"], -data.latents)  # every variant, flipped alike
    batch = data.batch(torch.Generator().manual_seed(0), 3)
    assert torch.equal(batch.companions["negative"], -batch.latents)
    # companions and the pixel masks are flipped with their image too: the masked image is latent * pixel mask
    assert torch.equal(batch.companions["masked"], batch.latents * batch.pixel_masks)
    assert torch.equal(data.companions["masked"], data.latents * data.pixel_masks)
    assert data.pixel_masks.shape == (6, 1, 8, 8) and data.pixel_masks.dtype == torch.bool
