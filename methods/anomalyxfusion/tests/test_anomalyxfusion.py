"""AnomalyXFusion (methods/anomalyxfusion): the X-embedding's parts against direct computations (Eq. 1-5, 13-14), DDF
recomputed at every denoising step, captions required and named when missing, fit and generation on the tiny
backbone with the ablation switches, the paper profile's CLIP path on a tiny open-clip stand-in."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys

import numpy as np
import pytest
import torch

from harness.errors import MethodError
from harness.methods import load_method

from tests.claims import claim_tests
from tests.fixtures import method_modules
from tests.spotted import COLOURS, spotted_split


@pytest.fixture(scope="module")
def parts():
    return method_modules("anomalyxfusion", "embedding")


def test_the_semantic_embedding_is_the_projected_normalised_caption_feature_k_times(parts):
    _, emb = parts
    torch.manual_seed(0)
    semantic = emb.SemanticEmbedding(6, 5, 3)
    features = torch.randn(2, 6)
    out = semantic(features)
    direct = (features / features.norm(dim=1, keepdim=True)) @ semantic.projection.weight.T + semantic.projection.bias
    assert out.shape == (2, 3, 5)
    for j in range(3):
        torch.testing.assert_close(out[:, j], direct)
    torch.testing.assert_close(semantic(7 * features), out)  # L2-normalised: the scale of the features is gone
    scaled = emb.SemanticEmbedding(6, 5, 3, scale=0.2)
    scaled.load_state_dict(semantic.state_dict())
    torch.testing.assert_close(scaled(features), direct[:, None].expand(-1, 3, -1) / direct.norm(dim=1)[:, None, None]
                               * 0.2)  # normalise_tokens: each token at the word embeddings' norm


def test_normalised_tokens_are_at_the_word_embeddings_norm_in_tiny_and_as_the_equations_in_paper(fitted):
    """`normalise_tokens` (tiny): e_sem's and e_loc's tokens at the mean norm of the backbone's word embeddings;
    `paper`: as Eq. 1-2 give them."""
    from harness.diffusion.backbone import load_frozen

    task, workdir = fitted
    method = load_method("anomalyxfusion", "tiny", QUICK)
    backbone = load_frozen(task.backbone)
    model = json.loads((workdir / "model.json").read_text())
    embedding = method._load_embedding(backbone, model, workdir)
    scale = float(backbone.text_encoder.get_input_embeddings().weight.norm(dim=1).mean())
    masks = torch.from_numpy(np.stack([a.mask for a in task.anomalies[:2]]))[:, None].float()
    with torch.no_grad():
        tokens = torch.cat([embedding.location(masks), embedding.semantic(torch.randn(2, model["x_embedding"]
                                                                                      ["caption_feature_dim"]))], 1)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.full(tokens.shape[:2], scale))
    assert load_method("anomalyxfusion", "paper").config["embedding"]["normalise_tokens"] is False


def test_the_mask_autoencoder_has_istrs_shape_and_its_dice_loss_is_the_formula(parts):
    _, emb = parts
    autoencoder = emb.MaskAutoencoder()  # ISTR's: 112 px, 16-32-64-128, 7 x 7 to 256
    convs = [m for m in autoencoder.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 16, (4, 4), (2, 2)), (16, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)),
        (128, 256, (7, 7), (1, 1))]
    assert sum(isinstance(m, torch.nn.ELU) for m in autoencoder.encoder) == 4
    masks = torch.zeros(2, 1, 80, 80)
    masks[:, :, 10:30, 20:60] = 1
    assert autoencoder.encode(masks).shape == (2, 256, 1, 1)
    assert autoencoder(masks).shape == (2, 1, 112, 112)
    x, y = torch.rand(3, 1, 4, 4), (torch.rand(3, 1, 4, 4) > 0.5).float()
    direct = np.mean([1 - 2 * float((x[i] * y[i]).sum()) / float((x[i] ** 2).sum() + (y[i] ** 2).sum())
                      for i in range(3)])
    assert emb.dice_loss(x, y).item() == pytest.approx(direct, rel=1e-5)
    assert emb.dice_loss(y, y).item() == pytest.approx(0, abs=1e-5)


def test_training_the_mask_autoencoder_lowers_its_dice_loss(parts):
    _, emb = parts
    fit = importlib.import_module(parts[0].__package__ + ".mask_autoencoder").fit_mask_autoencoder
    masks = np.zeros((4, 64, 64), bool)
    for i, (r, c) in enumerate([(10, 10), (30, 20), (20, 40), (40, 40)]):
        masks[i, r:r + 12, c:c + 16] = True
    torch.manual_seed(0)
    history = fit(emb.MaskAutoencoder(64), masks, {"steps": 150, "batch_size": 8, "learning_rate": 1e-3}, seed=0)
    assert history["dice_loss_after"] < 0.6 * history["dice_loss_before"], history


def _attention(layer: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out: per head softmax(q k^T / sqrt(d)) v, then the output projection."""
    width, heads = layer.embed_dim, layer.num_heads
    w_q, w_k, w_v = layer.in_proj_weight.split(width)
    b_q, b_k, b_v = layer.in_proj_bias.split(width)
    q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
    d = width // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d), dim=-1)
        out.append(weights @ v[..., s])
    return torch.cat(out, -1) @ layer.out_proj.weight.T + layer.out_proj.bias


def test_mif_is_e_mul_plus_the_mlp_of_token_self_attention(parts):
    _, emb = parts
    torch.manual_seed(0)
    fusion = emb.MultimodalFusion(8, 2, 16)
    e_mul = torch.randn(2, 6, 8)
    torch.testing.assert_close(fusion(e_mul), e_mul)  # the MLP's last layer starts at zero: e_X = e_mul
    for parameter in fusion.mlp[-1].parameters():
        torch.nn.init.normal_(parameter)
    linear1, linear2 = fusion.mlp[0], fusion.mlp[2]
    hidden = torch.nn.functional.gelu(_attention(fusion.attention, e_mul) @ linear1.weight.T + linear1.bias)
    direct = e_mul + hidden @ linear2.weight.T + linear2.bias
    torch.testing.assert_close(fusion(e_mul), direct, rtol=1e-4, atol=1e-5)


def test_ddf_concatenates_the_projected_sinusoidal_timestep_with_e_x_and_maps_it_back(parts):
    _, emb = parts
    torch.manual_seed(0)
    dynamic = emb.DynamicFusion(8, 6, 12)
    e_x = torch.randn(2, 5, 8)
    t = torch.tensor([10, 700])
    half = 3
    frequencies = torch.exp(-math.log(10000) * torch.arange(half) / half)
    tau = torch.cat([torch.cos(t[:, None] * frequencies), torch.sin(t[:, None] * frequencies)], 1)  # cos first
    time = tau @ dynamic.time.weight.T + dynamic.time.bias
    joined = torch.cat([e_x, time[:, None].expand(-1, 5, -1)], -1)
    l1, l2 = dynamic.mlp[0], dynamic.mlp[2]
    direct = torch.nn.functional.silu(joined @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(dynamic(e_x, t), direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dynamic(e_x, 10), dynamic(e_x, 11))  # e_t changes with t
    torch.testing.assert_close(dynamic(e_x, 700)[1], dynamic(e_x, t)[1])  # an int t is every sample's
    residual = emb.DynamicFusion(8, 6, 12, residual=True)  # an option (the tiny profile's before issue 36)
    torch.testing.assert_close(residual(e_x, t), e_x)  # its MLP's last layer starts at zero
    torch.nn.init.normal_(residual.mlp[2].weight)
    l1, l2 = residual.mlp[0], residual.mlp[2]
    joined = torch.cat([e_x, (tau @ residual.time.weight.T + residual.time.bias)[:, None].expand(-1, 5, -1)], -1)
    direct = e_x + torch.nn.functional.silu(joined @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(residual(e_x, t), direct, rtol=1e-4, atol=1e-5)


def _embedding(emb, semantic=True, mif=True, ddf=True):
    torch.manual_seed(0)
    location = emb.LocationEmbedding(emb.MaskAutoencoder(32), 8, 2, 16)
    textural = emb.TexturalEmbedding(["a", "b"], torch.randn(2, 2, 8))
    return emb.XEmbedding(location, textural, emb.SemanticEmbedding(6, 8, 2) if semantic else None,
                          emb.MultimodalFusion(8, 2, 16) if mif else None,
                          emb.DynamicFusion(8, 4, 16) if ddf else None).eval()


def test_the_x_embedding_is_semantic_location_textural_in_that_order_and_switches_as_table_6(parts):
    _, emb = parts
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 4:12, 4:12] = masks[1, :, 20:30, 10:14] = 1
    features = torch.randn(2, 6)
    base = _embedding(emb, semantic=False, mif=False, ddf=False)
    assert base.tokens == 4
    e = base(["b", "a"], None, masks, 5)
    torch.testing.assert_close(e, torch.cat([base.location(masks), base.textural(["b", "a"])], 1))
    full = _embedding(emb)
    assert full.tokens == 6
    e_mul = torch.cat([full.semantic(features), full.location(masks), full.textural(["a", "b"])], 1)
    torch.testing.assert_close(full.fused(["a", "b"], features, masks), full.fusion(e_mul))
    torch.testing.assert_close(full(["a", "b"], features, masks, 300), full.dynamic(full.fusion(e_mul), 300))
    zeroed = full.fused(["a", "b"], None, masks)  # the negative control: e_sem = 0
    e_mul[:, :2] = 0
    torch.testing.assert_close(zeroed, full.fusion(e_mul))
    with pytest.raises(ValueError, match="no textural embedding"):
        full(["c"], features[:1], masks[:1], 1)


def test_the_textural_tokens_start_from_each_types_own_image_features(parts):
    method, _ = parts
    features = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]])
    table = torch.full((10, 3), 2.0)  # token norms sqrt(12)
    initial = method.textural_init(features, ["x", "y", "x"], ["x", "y"], 3, table, seed=0)
    assert initial.shape == (2, 3, 3)
    scale = math.sqrt(12)
    torch.testing.assert_close(initial[0], torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]]) * scale)  # cycled
    torch.testing.assert_close(initial[1], torch.tensor([[0, 1.0, 0]] * 3) * scale)


# -- the method on the tiny backbone --


def _task(synth_root, backbone, category="weave", resolution=64):
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.tasks import build_task

    split = make_split(read_category(synth_root, category, dataset="synthetic"))
    task = build_task(split, sorted(split.defects), resolution, seed=0)
    task.backbone = backbone
    return task


def test_the_tiny_caption_features_are_the_mean_of_the_captions_word_rows_centred(parts, pretrained_backbone):
    """The tiny stand-in of CLIP's text features: a bag of words over the tiny text encoder's table, new words as
    seeded random rows, unknown words (and an empty caption) the <unk> row, minus the mean over the captions it is
    centred on."""
    from harness.diffusion.backbone import load_frozen

    features = importlib.import_module(parts[0].__package__ + ".features")
    backbone = load_frozen(pretrained_backbone[0])
    encoder = features.TinyCaptionEncoder(backbone, ["photo", "umbral", "blotch"], seed=3, centre_on=[])
    assert encoder.words == ["umbral", "blotch"]  # "photo" is a prompt word: no new row
    table = backbone.text_encoder.get_input_embeddings().weight.detach().cpu()
    vocab = backbone.tokenizer.get_vocab()
    out = encoder(["A umbral blotch.", "blotch, UMBRAL a", "photo", "", "a sooty photo"])
    torch.testing.assert_close(out[0], out[1])  # a bag: order, case and punctuation do not matter
    torch.testing.assert_close(out[2], table[vocab["photo"]])
    torch.testing.assert_close(out[3], table[vocab["<unk>"]])
    torch.testing.assert_close(out[4], (table[vocab["a"]] + table[vocab["<unk>"]] + table[vocab["photo"]]) / 3)
    training = ["A umbral blotch.", "a photo"]
    again = features.TinyCaptionEncoder(backbone, ["photo", "umbral", "blotch"], seed=3, centre_on=training)
    centre = (out[0] + table[[vocab["a"], vocab["photo"]]].mean(0)) / 2
    torch.testing.assert_close(again(["A umbral blotch.", "photo"]), out[[0, 2]] - centre)  # new rows: from the seed
    torch.testing.assert_close(again(training).mean(0), torch.zeros(table.shape[1]))
    assert encoder.coverage(["A umbral blotch.", "a sooty photo"])["unknown_words"] == 1


def test_the_caption_projection_mif_and_ddf_train_at_their_own_rate_where_set(parts):
    _, emb = parts
    embedding = _embedding(emb)
    rates = load_method("anomalyxfusion", "tiny")._learning_rates(embedding)
    by_part = {name: {rates[p] for p in getattr(embedding, name).parameters()}
               for name in ("semantic", "location", "fusion", "dynamic")}
    assert by_part == {"semantic": {5e-3}, "location": {1e-3}, "fusion": {1e-3}, "dynamic": {1e-3}}
    assert not any(id(p) in map(id, rates) for p in embedding.textural.parameters())  # the method's rate
    paper = load_method("anomalyxfusion", "paper")._learning_rates(embedding)  # null: embedding.learning_rate
    assert set(paper.values()) == {1e-4}


QUICK = {"steps_per_defect_type": 3, "inference_steps": 4, "generation_batch": 2,
         "embedding": {"location": {"steps": 5}}}


@pytest.fixture(scope="module")
def fitted(synth_root, pretrained_backbone, tmp_path_factory):
    from harness.generation import fit_method

    task = _task(synth_root, pretrained_backbone[0])
    workdir = tmp_path_factory.mktemp("axf")
    fit_method(load_method("anomalyxfusion", "tiny", QUICK), task, workdir)
    return task, workdir


def test_fit_records_its_stand_ins_and_generation_follows_the_targets(fitted):
    from harness.tasks import build_request

    task, workdir = fitted
    model = json.loads((workdir / "model.json").read_text())
    record = model["x_embedding"]
    assert record["caption_encoder"]["stand_in"].startswith("mean of the caption's word embeddings")
    assert record["caption_encoder"]["unknown_words"] == 0 and record["caption_encoder"]["words_added"] > 0
    assert record["training_captions"] == [a.caption for a in task.anomalies]  # the centre, rebuilt at generation
    assert record["caption_encoder"]["centred_on"] == len(task.anomalies)
    assert "tiny VAE encoder" in record["image_features"]["stand_in"]
    assert len(record["image_features"]["norms"]) == len(task.anomalies)
    assert record["mask_autoencoder"]["steps"] == 5
    method = load_method("anomalyxfusion", "tiny", QUICK)
    request = build_request(task, method, "hole", 3, seed=0)
    samples = list(method.generate(request, workdir))
    assert [s.caption for s in samples] == [t.caption for t in request.targets]
    assert all(s.caption for s in samples)
    assert all(np.array_equal(s.mask, t.mask) for s, t in zip(samples, request.targets))
    assert [s.normal_id for s in samples] == [t.normal.id for t in request.targets]


def test_a_fit_made_with_other_caption_features_is_refused(fitted, tmp_path):
    import shutil

    from harness.tasks import build_request

    task, workdir = fitted
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    model = json.loads((old / "model.json").read_text())
    model["x_embedding"]["caption_encoder"]["stand_in"] = ("mean of the caption's word embeddings in the tiny text "
                                                           "encoder's table (no CLIP)")  # before the centring
    (old / "model.json").write_text(json.dumps(model))
    method = load_method("anomalyxfusion", "tiny", QUICK)
    with pytest.raises(MethodError, match="fitted with other caption features.*fit it again"):
        list(method.generate(build_request(task, method, "hole", 1, seed=0), old))


def test_ddf_gives_the_unet_a_new_condition_at_every_denoising_step(fitted, parts, monkeypatch):
    from harness.tasks import build_request

    _, emb = parts
    task, workdir = fitted
    method = load_method("anomalyxfusion", "tiny", QUICK)
    request = build_request(task, method, "stain", 2, seed=0)
    calls, conditions = [], []
    forward = emb.DynamicFusion.forward

    def counted(self, e_x, t):
        calls.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return forward(self, e_x, t)

    monkeypatch.setattr(emb.DynamicFusion, "forward", counted)
    from harness.diffusion import backbone as backbones
    load = backbones.load_frozen

    def spied(*args, **kwargs):
        loaded = load(*args, **kwargs)
        original = loaded.unet.forward

        def record(sample, t, encoder_hidden_states=None, **rest):
            conditions.append(encoder_hidden_states.detach().clone())
            return original(sample, t, encoder_hidden_states=encoder_hidden_states, **rest)

        loaded.unet.forward = record
        return loaded

    monkeypatch.setattr(backbones, "load_frozen", spied)
    list(method.generate(request, workdir))
    assert len(calls) == QUICK["inference_steps"] and len(set(calls)) == len(calls)  # once per step, each its t
    assert len(conditions) == QUICK["inference_steps"]
    assert all(not torch.allclose(a, b) for a, b in zip(conditions, conditions[1:]))


@pytest.mark.parametrize("switches,tokens", [({"semantic": False, "mif": False, "ddf": False}, 6),
                                             ({"semantic": True, "mif": True, "ddf": False}, 9)])
def test_the_ablation_variants_fit_and_generate(synth_root, pretrained_backbone, tmp_path, switches, tokens):
    from harness.generation import fit_method
    from harness.tasks import build_request

    task = _task(synth_root, pretrained_backbone[0])
    settings = {**QUICK, "embedding": {**QUICK["embedding"], **switches}}
    method = load_method("anomalyxfusion", "tiny", settings)
    fit_method(method, task, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "embedding.safetensors"))
    assert any(k.startswith("semantic.") for k in saved) == switches["semantic"]
    assert any(k.startswith("fusion.") for k in saved) == switches["mif"]
    assert not any(k.startswith("dynamic.") for k in saved)
    samples = list(load_method("anomalyxfusion", "tiny", settings).generate(
        build_request(task, method, "thread", 2, seed=0), tmp_path))
    assert len(samples) == 2
    from harness.diffusion.backbone import load_frozen

    model = json.loads((tmp_path / "model.json").read_text())
    assert method._load_embedding(load_frozen(pretrained_backbone[0]), model, tmp_path).tokens == tokens


def test_a_missing_caption_is_an_error_naming_the_image(synth_root, pretrained_backbone, tmp_path, fitted):
    from harness.generation import fit_method
    from harness.tasks import build_request

    task = _task(synth_root, pretrained_backbone[0])
    first = task.anomalies[0]
    task.anomalies[0] = dataclasses.replace(first, caption=None)
    with pytest.raises(MethodError, match=f"{first.id}.*has no caption"):
        fit_method(load_method("anomalyxfusion", "tiny", QUICK), task, tmp_path)
    task, workdir = fitted
    method = load_method("anomalyxfusion", "tiny", QUICK)
    request = build_request(task, method, "hole", 2, seed=0)
    request.targets[1].caption = None
    with pytest.raises(MethodError, match=f"needs a caption.*{request.targets[1].normal.id}"):
        list(method.generate(request, workdir))


def test_bad_settings_are_named():
    with pytest.raises(MethodError, match="masks must be 'data'"):
        load_method("anomalyxfusion", "tiny", {"masks": "generated"})
    with pytest.raises(MethodError, match="embedding.features"):
        load_method("anomalyxfusion", "tiny", {"embedding": {"features": "bert"}})
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'embedding.text'"):
        load_method("anomalyxfusion", "tiny", {"embedding": {"text": True}})


def test_the_paper_profiles_clip_path_loads_an_open_clip_checkpoint(parts, tmp_path):
    """The paper profile's features through open-clip's own loader, on a tiny random stand-in of ViT-B/32 saved as a
    checkpoint (the real weights cannot be downloaded here): text and image features of the right size, and a
    damaged file named in the error."""
    open_clip = pytest.importorskip("open_clip")
    features = importlib.import_module(parts[0].__package__ + ".features")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "TinyClipStandIn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "TinyClipStandIn.json")
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("TinyClipStandIn").state_dict(), checkpoint)
    clip = features.ClipFeatures("TinyClipStandIn", checkpoint, torch.device("cpu"))
    text = clip(["A dark crack.", "A hole."])
    assert text.shape == (2, 16) and not torch.allclose(text[0], text[1])
    images = np.zeros((2, 40, 40, 3), np.uint8)
    images[1] = 200
    masks = np.ones((2, 40, 40), bool)
    assert clip.images.dim == 16 and clip.images(images, masks).shape == (2, 16)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MethodError, match="broken.pt"):
        features.ClipFeatures("TinyClipStandIn", tmp_path / "broken.pt", torch.device("cpu"))


def test_the_ablation_suite_is_table_6_with_its_keys_as_labels():
    import yaml  # noqa: I001

    from harness.runner.suite import load_suite

    suite = load_suite("ablation-anomalyxfusion")
    switches = {m.label: {k: load_method(m.method, suite.profile, m.config).config["embedding"][k]
                          for k in ("semantic", "mif", "ddf")} for m in suite.methods}
    assert switches == {
        "anomalyxfusion_base": {"semantic": False, "mif": False, "ddf": False},
        "anomalyxfusion_text": {"semantic": True, "mif": False, "ddf": False},
        "anomalyxfusion_text_mif": {"semantic": True, "mif": True, "ddf": False},
        "anomalyxfusion_text_ddf": {"semantic": True, "mif": False, "ddf": True},
        "anomalyxfusion": {"semantic": True, "mif": True, "ddf": True}}
    from harness.report.leaderboard import REPORTED_DIR

    table = yaml.safe_load((REPORTED_DIR / "anomalyxfusion-table6.yaml").read_text())
    assert set(table["values"]) == set(switches)


def test_a_data_set_without_captions_leaves_the_method_out_of_methods_all_and_fails_it_when_named(synth_root, tmp_path):
    """MVTec AD without MVTec Caption: `methods: all` runs every other method and says why anomalyxfusion is left
    out; a suite that names it fails, saying where captions are looked for; with captions it is planned."""
    import shutil

    from harness.runner.plan import expand, prepare
    from harness.runner.suite import parse_suite

    root = tmp_path / "ad"
    shutil.copytree(synth_root / "washer", root / "washer")
    shutil.rmtree(root / "washer" / "prompt")
    raw = {"datasets": [{"name": "plain", "layout": "mvtec_ad", "root": str(root), "categories": ["washer"]}],
           "protocol": "clean-thirds", "profile": "tiny", "generate": {"n": 2}, "metrics": ["fid"],
           "seeds": [0], "executor": {"kind": "serial"}}
    plan = prepare(parse_suite({**raw, "methods": "all"}, None))
    assert plan.left_out == {"plain": ["anomalyxfusion"]}
    assert any("anomalyxfusion left out" in w for w in plan.warnings)
    methods = {j.tags.get("method") for j in expand(plan) if j.kind == "fit"}
    assert "anomalyxfusion" not in methods and "anomalydiffusion" in methods
    with pytest.raises(Exception, match="need captions.*'plain' has none"):
        prepare(parse_suite({**raw, "methods": ["anomalyxfusion", "cutpaste"]}, None))
    shutil.copytree(synth_root / "washer" / "prompt", root / "washer" / "prompt")
    plan = prepare(parse_suite({**raw, "methods": ["anomalyxfusion"]}, None))
    assert not plan.left_out and any(j.kind == "fit" for j in expand(plan))


# -- the paper's claims on the tiny profile (tests/claims.py's measures), each with controls --


def _captioned(request, sources, partners):
    """The request with the same normal images, masks and seed, each target captioned as the partner of the training
    anomaly its mask came from (`sources[i]` and `partners[i]`: the same stain in two colours)."""
    caption = {source.id: partner.caption for source, partner in zip(sources, partners)}
    targets = [dataclasses.replace(t, caption=caption[t.caption_source]) for t in request.targets]
    return dataclasses.replace(request, defect_type="stain", targets=targets)


@pytest.fixture(scope="module")
def spotted(tmp_path_factory):
    """SpottedWeave at 64 px, 18 stains of each colour, and its split (6 training stains of each colour)."""
    return spotted_split(tmp_path_factory.mktemp("spotted"), 64)


def test_the_caption_claims_classifier_tells_real_stains_apart_at_the_generators_strength(spotted):
    """The caption claim's instrument, on the split's held-out real stains: right at full strength and at 35 % (the
    tiny generator's stains move the colour about a third of the way), sharp or blurred; without the strength and
    blur augmentation (negative control) it calls every faint stain one colour."""
    import cv2

    from harness.tasks import build_task, to_item

    from tests.claims import DefectTypeClassifier, weaker

    training = build_task(spotted, COLOURS, 64, seed=0).anomalies
    held_out = [to_item(s, 64) for c in COLOURS for s in spotted.defects[c].test]

    def accuracy(classifier, strength: float, blur: float = 0) -> float:
        images = [weaker(a.image, a.mask, strength) for a in held_out]
        images = [cv2.GaussianBlur(i, (0, 0), blur) for i in images] if blur else images
        picks = classifier.predict(images, [a.mask for a in held_out])
        return float(np.mean([p == a.defect_type for p, a in zip(picks, held_out)]))

    augmented, plain = DefectTypeClassifier(training), DefectTypeClassifier(training, weakest=1, softest=0)
    right = {(strength, blur): accuracy(augmented, strength, blur) for strength in (1, 0.35) for blur in (0, 1)}
    assert min(right.values()) >= 0.9, right
    assert accuracy(plain, 1) >= 0.9 and accuracy(plain, 0.35) <= 0.6, (accuracy(plain, 1), accuracy(plain, 0.35))


CLAIM_SIZE = 128  # px, as AnomalyDiffusion's claims: a stain covers 2-4 latent cells
CLAIM_STEPS = 300  # fine-tuning steps: the tiny profile's
CLAIM_SAMPLES = 12  # per caption colour
CONTROLS = ("no fine-tuning", "caption swapped", "MIF off", "DDF off")


@pytest.fixture(scope="module")
def caption_claims(parts, pretrained_backbone, tmp_path_factory):
    """AnomalyXFusion's tiny profile (the UNet frozen; the X-embedding trained) fitted on SpottedWeave's dark and pale
    stains as one defect type, "stain": one textural embedding, and every mask with both colours, so only the caption
    says the colour. Then the same normal images, masks and seed, generated with the dark stains' and with the pale
    stains' training captions, by the working method and by controls that each break one of its parts: no
    fine-tuning; each caption swapped for its twin's (dark <-> pale: a sample that follows its caption then shows the
    other colour); MIF off at generation (e_X = e_mul); DDF off at generation (e_t = e_X). A classifier trained on the
    real training stains says which colour each sample shows ("type"), and each pale-captioned sample is compared
    with its dark-captioned twin (the same normal image, mask and noise). The re-weighting is on, as the authors'
    rule for a texture anomaly."""
    from harness.generation import fit_method
    from harness.tasks import build_request, build_task

    from tests.claims import DefectTypeClassifier, blend_margin, variant_measures

    _, emb = parts
    task = build_task(spotted_split(tmp_path_factory.mktemp("axf_spotted"), CLAIM_SIZE), COLOURS, CLAIM_SIZE, seed=0)
    task.backbone = pretrained_backbone[0]
    dark = task.anomalies_of("dark")
    assert all(np.array_equal(d.mask, p.mask) for d, p in zip(dark, task.anomalies_of("pale")))
    one_type = dataclasses.replace(task, defect_types=["stain"],
                                   anomalies=[dataclasses.replace(a, defect_type="stain") for a in task.anomalies])
    one_type.backbone = task.backbone
    settings = {"adaptive_mask": True}
    fits = {}
    for name, steps in (("working", CLAIM_STEPS), ("no fine-tuning", 0)):
        fits[name] = tmp_path_factory.mktemp("axf_fit")
        fit_method(load_method("anomalyxfusion", "tiny", {**settings, "steps_per_defect_type": steps}), one_type,
                   fits[name])
    classifier = DefectTypeClassifier(task.anomalies)
    fused = emb.XEmbedding.fused

    def without_fusion(self, defect_types, caption_features, masks):
        fusion, self.fusion = self.fusion, None
        try:
            return fused(self, defect_types, caption_features, masks)
        finally:
            self.fusion = fusion

    method = load_method("anomalyxfusion", "tiny", settings)
    request = build_request(task, method, "dark", CLAIM_SAMPLES, seed=3)
    out = {}
    for name in ("working", *CONTROLS):
        runs = []
        for colour in COLOURS:
            captioned = COLOURS[1 - COLOURS.index(colour)] if name == "caption swapped" else colour
            asked = _captioned(request, dark, task.anomalies_of(captioned))
            with pytest.MonkeyPatch.context() as patch:
                if name == "MIF off":
                    patch.setattr(emb.XEmbedding, "fused", without_fusion)
                if name == "DDF off":
                    patch.setattr(emb.XEmbedding, "at_step", lambda self, e_x, t: e_x)
                samples = list(method.generate(asked, fits.get(name, fits["working"])))
            runs.append((samples, dataclasses.replace(asked, defect_type=colour), colour))
        # "type" is the captioned colour the sample was asked for
        out[name] = variant_measures(task, runs, classifier, blend_margin(method))
        inside = [np.array([s.image[t.mask].mean() for s, t in zip(samples, asked.targets)])
                  for samples, asked, _ in runs]  # the same targets in both runs: twins
        out[name]["pale twin brighter"] = float(np.mean(inside[COLOURS.index("pale")] > inside[COLOURS.index("dark")]))
        print(f"{name:16s} " + "  ".join(f"{k} {v:.3f}" for k, v in out[name].items()))  # (-s shows them)
    return out


# Measured at three fit and generation seeds (0 is the test's; 128 px, 300 steps, 12 samples per colour):
#   variant          contrast  defect              type                 pale twin brighter  fills mask
#   working          6.3-8.4   1.01 / 0.89 / 0.91  0.875 / 0.667 / 0.75  1 / 1 / 1           0.951 / 0.924 / 0.890
#   no fine-tuning   3.9-5.0   0.01 / 0.10 / 0.03  0.50                 0 / 0.25 / 0.92     0.61 / 0.79 / 0.79
#   caption swapped  6.3-8.4   -0.97 to -0.69      0.12-0.33            0 / 0 / 0           0.89-0.95
#   MIF off          3.5-4.2   -0.05 to 0.05       0.50-0.67            1 / 1 / 1           0.56-0.66
#   DDF off          4.5-6.3   0.17 / 0.47 / -0.24  0.29-0.63            1 / 0.75 / 0        0.710 / 0.798 / 0.756
# Background 41.3-41.9 dB in every variant. The bounds lie between the working method's lowest and the controls'.
AXF_CLAIMS = {
    "background kept (blended sampling)": lambda m: m["background"] >= 36.0,
    "defect drawn in the mask, of the captioned colour": lambda m: m["contrast"] >= 1.45 and m["defect"] >= 0.25,
    "the sample follows its caption": lambda m: m["pale twin brighter"] >= 0.75 and m["type"] >= 0.6,
    "the defect fills its mask": lambda m: m["fills mask"] >= 0.85,
}


test_the_working_method_holds_every_claim, test_each_control_fails_its_claims = claim_tests(
    AXF_CLAIMS, "caption_claims", [(control, None) for control in CONTROLS])


# ---- the `paper` profile rehearsed end to end on LDM text2img-large's and CLIP ViT-B/32's layouts -------------------

def test_the_paper_profile_fits_and_generates_on_ldm_and_clips_layouts(parts, synth_root, tmp_path, monkeypatch):
    """Every branch of the paper configuration once, with only the step counts cut (and CLIP's widths, as the
    backbone's): 256-px content, the X-embedding (e_sem from CLIP's caption features, e_loc from ISTR's mask
    auto-encoder trained here, the textural tokens from CLIP's image features, MIF, DDF) trained on the frozen LDM
    with CLIP frozen; what trains and what stays frozen, counted; blended DDIM with eta 1, DDF's new condition at
    every step."""
    from safetensors.torch import load_file

    from harness.diffusion import ddim
    from harness.diffusion.backbone import load_frozen, split_words
    from harness.generation import fit_method
    from harness.profiles import get_profile
    from harness.tasks import build_request
    from tests.rehearsal import clip_vit_b_32, ldm_text2img_large, watch

    paper = load_method("anomalyxfusion", "paper").config
    e = paper["embedding"]
    assert (paper["steps_per_defect_type"], paper["batch_size"], paper["learning_rate"], paper["unet_lora"],
            paper["masks"], paper["inference_steps"], paper["eta"], paper["blend"], paper["adaptive_mask"],
            paper["placeholder"]) == (4167, 4, 0.02, None, "data", 200, 1.0, "before", "textures", "*")
    assert (e["tokens"], e["semantic"], e["mif"], e["ddf"], e["learning_rate"], e["normalise_tokens"], e["features"],
            e["clip"]["model"], e["fusion"]["heads"], e["dynamic"]["time_dim"], e["dynamic"]["residual"],
            e["location"]["size"], e["location"]["code"], e["location"]["steps"]) == (
        4, True, True, True, 1e-4, False, "clip", "ViT-B-32", 8, 320, False, 112, 256, 2000)
    model_name, checkpoint = clip_vit_b_32(tmp_path / "clip")
    method = load_method("anomalyxfusion", "paper", {
        "steps_per_defect_type": 2, "inference_steps": 2, "generation_batch": 2,
        "embedding": {"location": {"steps": 2}, "clip": {"model": model_name, "weights": str(checkpoint)}}})
    assert method.config["placeholder"] == "*"  # AnomalyDiffusion's for the profile
    words = split_words(" ".join(method.config["templates"] + ["anomaly"]))
    folder = ldm_text2img_large(tmp_path / "ldm", words)
    size = method.working_resolution(get_profile("paper").resolution)
    assert size == 256
    task = _task(synth_root, folder, resolution=size)
    task.defect_types = task.defect_types[:1]
    task.anomalies = [a for a in task.anomalies if a.defect_type == task.defect_types[0]]
    base = sys.modules[type(method).__mro__[1].__module__]  # the fit is AnomalyDiffusion's
    clips = []
    make_clip = type(method)._clip
    monkeypatch.setattr(type(method), "_clip", lambda self, b: clips.append(make_clip(self, b)) or clips[-1])
    seen = watch(monkeypatch, base)
    work = tmp_path / "fit"
    fit_method(method, task, work)

    record = json.loads((work / "model.json").read_text())
    (call,) = seen.calls
    backbone = load_frozen(folder, torch.device("cpu"))
    assert call["backbone_trainable"] == set() and call["frozen"] == seen.count(backbone, False)
    assert call["trained"] == record["trained_parameters"]
    clip_parameters = {id(p) for clip in clips for p in clip.network.parameters()}
    assert clips and not clip_parameters & {id(p) for p in call["params"]}
    assert not any(p.requires_grad for clip in clips for p in clip.network.parameters())
    saved = load_file(str(work / "embedding.safetensors"))
    groups = {name.split(".")[0] for name in saved}
    assert {"semantic", "location", "textural", "fusion", "dynamic"} <= groups, groups
    x = record["x_embedding"]
    assert x["caption_encoder"]["model"] == model_name and x["image_features"]["model"] == model_name
    print(f"rehearsal: frozen {call['frozen']:,} parameters (and CLIP's), trained {call['trained']:,}")

    calls, steps = [], []
    real, at_step = ddim.blended_sample, parts[1].XEmbedding.at_step
    monkeypatch.setattr(ddim, "blended_sample", lambda *a, **k: calls.append((type(a[4]).__name__, k["eta"])) or
                        real(*a, **k))
    monkeypatch.setattr(parts[1].XEmbedding, "at_step", lambda self, e_x, t: steps.append(int(t)) or
                        at_step(self, e_x, t))
    request = build_request(task, method, task.defect_types[0], 2, seed=0)
    samples = list(method.generate(request, work))
    assert calls == [("DDIMScheduler", 1.0)]
    assert len(set(steps)) == 2  # DDF: a new e_t at each of the 2 denoising steps
    assert len(samples) == 2 and all(s.image.shape == (256, 256, 3) for s in samples)
    assert all(s.extra["adaptive_mask"] and s.caption for s in samples)
