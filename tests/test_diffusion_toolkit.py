"""The shared diffusion toolkit (harness/diffusion/): LoRA adapters, attention processors, placeholders and the
fine-tuning loop, each on small tensors against a direct computation or the library it wraps."""
from __future__ import annotations

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
