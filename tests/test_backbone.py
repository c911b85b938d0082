"""The shipped tiny backbone (harness/diffusion/shipped.py, corpus.py, provision.py): it is what the code would build,
it loads and draws, runs on its categories use it as it is, and a category it has not seen is fine-tuned from it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.diffusion import corpus, provision, shipped


def test_the_shipped_backbone_records_the_recipe_and_corpus_the_code_would_build():
    folder = shipped.SHIPPED
    training = json.loads((folder / shipped.TRAINING_FILE).read_text())
    record = json.loads((folder / shipped.CORPUS_FILE).read_text())
    assert training["recipe"] == json.loads(json.dumps(shipped.RECIPE.as_dict()))
    assert record["version"] == training["corpus"]["version"] == corpus.CORPUS_VERSION
    assert record["id"] == training["corpus"]["id"] == corpus.corpus_id(shipped.RECIPE.corpus)
    assert record["config"] == json.loads(json.dumps(dataclasses.asdict(shipped.RECIPE.corpus)))
    # its content: 48 generic scenes drawn again (scene i has its own random stream), the normals' file hashes
    config = shipped.RECIPE.corpus
    assert len(record["generic_scenes"]) == config.generic
    for i in np.random.default_rng(0).choice(config.generic, 48, replace=False):
        image, caption = corpus.generic_scene(np.random.default_rng([config.seed, int(i)]), config.size,
                                              config.photo_rate)
        assert shipped.scene_hash(image, caption) == record["generic_scenes"][i], f"generic scene {i} changed"
    _, hashes = corpus.synthetic_normals(config)
    assert record["normals"] == hashes
    content = shipped.corpus_content(record["generic_scenes"], record["normals"])
    assert content == record["content"] == training["corpus"]["content"]
    # its vocabulary: the reserved words and the corpus's
    from harness.diffusion.backbone import BASE_WORDS, RARE_TOKENS, SPECIAL_TOKENS, load

    vocab = load(folder).tokenizer.get_vocab()
    assert set(vocab) == {*SPECIAL_TOKENS, *BASE_WORDS, *RARE_TOKENS, *corpus.vocabulary(config.categories)}


def test_the_shipped_backbone_is_safetensors_within_25_mb_and_opens_as_a_pipeline():
    from diffusers import StableDiffusionPipeline

    files = [f for f in shipped.SHIPPED.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files) <= 25e6
    pipe = StableDiffusionPipeline.from_pretrained(str(shipped.SHIPPED), local_files_only=True)
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert (shipped.SHIPPED / "README.md").is_file() and (shipped.SHIPPED / shipped.GRID_FILE).is_file()


@pytest.mark.slow
def test_the_shipped_backbone_draws_its_categories_from_noise():
    """A few samples per category from pure noise sit nearest their own category; with the prompt of another
    category (the negative control) they do not."""
    from harness.diffusion import quality
    from harness.diffusion.backbone import load_frozen
    from harness.diffusion.pretrain import prompt_for

    backbone = load_frozen(shipped.SHIPPED, torch.device("cpu"))
    references = quality.synthetic_images(("weave", "washer", "tray"))
    for ref, other in zip(references, ("washer", "tray", "weave")):
        own = quality.samples_from_noise(backbone, prompt_for(ref.category), 4, steps=15)
        assert quality.recognised(own, ref.category, references) >= 0.75, ref.category
        swapped = quality.samples_from_noise(backbone, prompt_for(other), 4, steps=15)
        assert quality.recognised(swapped, ref.category, references) <= 0.25, (ref.category, other)


# --- runs: the shipped backbone as it is, or fine-tuned --------------------------------------------------------------


def _suite(tmp_path: Path, **changes):
    import yaml

    from harness.runner.suite import parse_suite

    raw = yaml.safe_load((Path(__file__).parent / "suites" / "mini.yaml").read_text())
    raw.update(methods=[{"method": "background_aware", "config": {"steps": 2, "inference_steps": 2}}],
               metrics=["bg_psnr", "mask_iou"], backbone={"unet_steps": 3, "batch_size": 2})
    raw.update(changes)
    return parse_suite(raw, tmp_path / "suite.yaml")


SHIPPED_DATA = [{"name": "synthetic", "layout": "synthetic", "categories": ["washer", "tray"]}]


def test_a_run_on_the_shipped_backbones_categories_has_no_backbone_job(tmp_path):
    from harness.runner.plan import expand, prepare

    jobs = expand(prepare(_suite(tmp_path, datasets=SHIPPED_DATA)))
    assert not [j for j in jobs if j.kind == "backbone"]
    fits = [j for j in jobs if j.kind == "fit"]
    identity = provision.shipped_identity(shipped.SHIPPED)
    assert fits and all(j.deps == () and j.where.backbone_folder == str(shipped.SHIPPED) for j in fits)
    assert {j.params.backbone for j in fits} == {j.tags["backbone"] for j in fits} == {f"defectbench-tiny:{identity}"}


@pytest.mark.slow  # 48 s: make test keeps within its 15 minutes
def test_unseen_normal_images_are_fine_tuned_on_once_and_reused(tmp_path, isolated_cache):
    """mini.yaml's 48 px images are not the shipped backbone's: one fine-tuning job per data set, before every fit;
    its result is cached; other settings are another backbone and other fits."""
    from harness.results import run_records
    from harness.runner.plan import expand, prepare
    from harness.runner.run import run_suite

    jobs = expand(prepare(_suite(tmp_path)))
    (backbone,) = [j for j in jobs if j.kind == "backbone"]
    fits = [j for j in jobs if j.kind == "fit"]
    assert fits and all(j.deps == (backbone.key,) and not j.where.backbone_folder for j in fits)
    first = run_suite(_suite(tmp_path), executor="serial", results=tmp_path / "a", progress=False)
    assert set(first.states.values()) == {"done"}, first.states
    info = json.loads((first.store.job_dir(backbone.key) / "backbone.json").read_text())
    assert info["kind"] == "tiny-finetuned" and info["reused"] is False
    # clean-thirds keeps 7 of each category's 8 normal training images for training
    assert info["words_added"] == [] and info["images"] == {"weave": 7, "washer": 7}
    assert (isolated_cache / "backbones" / info["key"] / "unet").is_dir()
    assert set(run_records(first.store)["backbone"]) == {backbone.tags["backbone"]}
    second = run_suite(_suite(tmp_path), executor="serial", results=tmp_path / "b", progress=False)
    assert json.loads((second.store.job_dir(backbone.key) / "backbone.json").read_text())["reused"] is True
    for changed in ({"unet_steps": 4, "batch_size": 2}, {"unet_steps": 3, "batch_size": 2, "generic_share": 0.5}):
        other = expand(prepare(_suite(tmp_path, backbone=changed)))
        assert not {j.key for j in other if j.kind in ("backbone", "fit")} & {j.key for j in jobs}


def test_the_fine_tuning_settings_are_checked_when_the_suite_is_read(tmp_path):
    from harness.errors import ConfigError

    for bad, message in (({"vae_steps": 3}, r"\['vae_steps'\] cannot be set"),
                         ({"prediction_type": "epsilon"}, "cannot be set"),
                         ({"unet_steps": -5}, r"backbone.unet_steps: -5 is not a non-negative int"),
                         ({"unet_lr": "x"}, r"backbone.unet_lr: 'x' is not a non-negative float"),
                         ({"generic_share": 1.5}, r"backbone.generic_share: 1.5 must lie in \[0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            _suite(tmp_path, backbone=bad)


HELD_OUT_SIZE = 64  # a quarter of the shipped backbone's pixels: the claim, in minutes


@pytest.fixture(scope="module")
def held_out_backbone(tmp_path_factory) -> Path:
    """A small backbone trained like the shipped one (at 64 px) on weave and washer only: pill is held out."""
    recipe = shipped.Recipe(corpus=corpus.CorpusConfig(generic=48, categories=("weave", "washer")),
                            pretrain=dataclasses.replace(shipped.RECIPE.pretrain, resolution=HELD_OUT_SIZE,
                                                         vae_steps=150, unet_steps=200, vae_batch=16, batch_size=8,
                                                         checkpoint_every=0))
    return shipped.train(tmp_path_factory.mktemp("held-out") / "backbone", recipe, progress=False,
                         announce=lambda line: None)


@pytest.mark.slow
def test_a_category_the_backbone_has_not_seen_is_fine_tuned_from_it(tmp_path, monkeypatch, held_out_backbone):
    """On pill, which the backbone never saw, a run fine-tunes it first: "pill" joins its vocabulary (every other id
    kept) and its clean-latent error on pill's held-out normals falls. With a rate of 0 (the control) it does not.
    (`make test-slow`: a backbone trained for the test and three fine-tunings.)"""
    from harness.diffusion import quality
    from harness.diffusion.backbone import load_frozen
    from harness.runner.plan import expand, prepare

    monkeypatch.setenv(provision.SHIPPED_ENV, str(held_out_backbone))
    seen = expand(prepare(_suite(tmp_path, datasets=[{**SHIPPED_DATA[0], "categories": ["washer"]}])))
    assert not [j for j in seen if j.kind == "backbone"]
    unseen = expand(prepare(_suite(tmp_path, datasets=[{**SHIPPED_DATA[0], "categories": ["pill"]}])))
    (job,) = [j for j in unseen if j.kind == "backbone"]
    normals = [provision.NormalImages("pill", tuple(Path(p) for p in job.where.paths["pill"]),
                                      tuple(job.params.normals[0].hashes))]
    (pill,) = quality.synthetic_images(("pill",), HELD_OUT_SIZE)

    def error(folder: Path) -> float:
        return quality.clean_latent_errors(load_frozen(folder, torch.device("cpu")), pill, (100, 300))[300]["unet"]

    before = error(held_out_backbone)
    settings = {"unet_steps": 120, "batch_size": 8}
    folder, info = provision.tiny_backbone(normals, settings, HELD_OUT_SIZE)
    assert info["kind"] == "tiny-finetuned" and info["words_added"] == ["pill"]
    old, new = load_frozen(held_out_backbone).tokenizer.get_vocab(), load_frozen(folder).tokenizer.get_vocab()
    assert {w: new[w] for w in old} == old and new["pill"] == len(old)
    after = error(folder)
    assert after < 0.9 * before, (before, after)
    assert provision.tiny_backbone(normals, settings, HELD_OUT_SIZE)[1]["reused"] is True
    frozen, _ = provision.tiny_backbone(normals, {**settings, "unet_lr": 0.0}, HELD_OUT_SIZE)
    assert error(frozen) > 0.97 * before, (before, error(frozen))


def test_a_killed_fine_tuning_resumes_to_the_uninterrupted_result_with_the_same_words_and_scale(tmp_path,
                                                                                                monkeypatch):
    """Fine-tuning a trained backbone on a new word: the word is appended (every earlier id kept), the autoencoder's
    latent scale stays the trained one, and a run killed in the UNet stage resumes to exactly the uninterrupted
    run's weights and losses."""
    from harness.diffusion import backbone as backbones
    from harness.diffusion import pretrain as pre

    base = backbones.build_tiny(["weave"], 32)
    base.vae.register_to_config(scaling_factor=0.37)
    base.save(tmp_path / "base")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    captions = ["a photo of a bolt", "a photo of a weave"] * 3
    config = pre.PretrainConfig(resolution=32, vae_steps=0, unet_steps=6, batch_size=2, checkpoint_every=2)
    whole, history = pre.pretrain(images, captions, config, start_from=backbones.load(tmp_path / "base"))
    old, new = base.tokenizer.get_vocab(), whole.tokenizer.get_vocab()
    assert {w: new[w] for w in old} == old and new["bolt"] == len(old) and len(new) == len(old) + 1
    assert whole.latent_scale == 0.37 and history["vae"] == []
    real_run, calls = pre._Stage.run, {"n": 0}

    def dying(self, step_loss, saved, progress):
        def counted():
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
            return step_loss()
        return real_run(self, counted, saved, progress)

    monkeypatch.setattr(pre._Stage, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        pre.pretrain(images, captions, config, checkpoints=tmp_path / "partial",
                     start_from=backbones.load(tmp_path / "base"))
    monkeypatch.setattr(pre._Stage, "run", real_run)
    resumed, again = pre.pretrain(images, captions, config, checkpoints=tmp_path / "partial",
                                  start_from=backbones.load(tmp_path / "base"))
    assert again["unet"] == history["unet"] and resumed.latent_scale == 0.37
    for name in ("unet", "text_encoder"):
        for a, b in zip(getattr(whole, name).state_dict().values(), getattr(resumed, name).state_dict().values()):
            assert torch.equal(a, b), name


def test_the_backbone_can_be_fine_tuned_on_more_categories_than_the_suite_runs(tmp_path):
    """`pretrain_categories`: the fine-tuning learns from those categories' normal training images, the methods
    fit and generate on the suite's categories alone; an unknown category is named."""
    from harness.errors import ConfigError
    from harness.runner.plan import expand, prepare

    def data(**extra):
        return [{"name": "synthetic", "layout": "synthetic", "categories": ["washer"],
                 "synth": {"seed": 0, "size": 48, "n_train": 8, "n_validation": 2, "n_test_good": 2, "n_defect": 4},
                 **extra}]

    jobs = expand(prepare(_suite(tmp_path, datasets=data(pretrain_categories=["weave", "washer"]))))
    (backbone,) = [j for j in jobs if j.kind == "backbone"]
    assert [n.category for n in backbone.params.normals] == ["weave", "washer"]
    assert {j.params.category for j in jobs if j.kind == "fit"} == {"washer"}
    alone = expand(prepare(_suite(tmp_path, datasets=data())))
    (own,) = [j for j in alone if j.kind == "backbone"]
    assert [n.category for n in own.params.normals] == ["washer"] and own.key != backbone.key
    with pytest.raises(ConfigError, match="no category 'bolt'"):
        prepare(_suite(tmp_path, datasets=data(pretrain_categories=["bolt"])))


# --- bf16 only where the CPU computes it ---------------------------------------------------------------------------


@pytest.mark.parametrize("capabilities, isa, expected", [
    ({"architecture": "x86_64", "avx2": True}, "AVX2", "float32"),
    ({"architecture": "x86_64", "avx512_f": True}, "AVX512", "float32"),
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True}, "AVX2", "float32"),
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True}, "AVX512", "bfloat16"),
    ({"architecture": "x86_64", "amx_bf16": True}, "AVX512", "bfloat16"),
    ({"architecture": "aarch64", "neon": True}, "DEFAULT", "float32"),
    ({"architecture": "aarch64", "bf16": True}, "DEFAULT", "bfloat16"),
])
def test_bf16_autocast_runs_only_where_the_cpu_computes_bf16(monkeypatch, capabilities, isa, expected):
    from harness import device

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    device.cpu_computes_bf16.cache_clear()
    try:
        assert device.autocast_type(torch.device("cpu"), "auto") == expected
        assert device.autocast_type(torch.device("cpu"), "float32") == "float32"
        with device.autocast(torch.device("cpu"), "auto"):
            out = torch.nn.Linear(4, 4)(torch.ones(2, 4))
        assert out.dtype == getattr(torch, expected)
    finally:
        device.cpu_computes_bf16.cache_clear()


def test_a_cpu_capped_at_avx2_runs_auto_in_float32():
    """The real check, as on an AVX2-only CPU: torch's kernels capped at AVX2 (ATEN_CPU_CAPABILITY) and oneDNN's too."""
    import subprocess
    import sys

    code = ("import torch; from harness.device import autocast_type; "
            "print(torch.backends.cpu.get_cpu_capability(), autocast_type(torch.device('cpu'), 'auto'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=shipped.REPO_ROOT,
                         env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.stdout.split() == ["AVX2", "float32"]


def test_a_checkpoint_missing_weights_is_refused_naming_the_network(sd15_rehearsal, tmp_path):
    """from_pretrained would initialise the missing weights at random with a warning (transformers 4.x reading a
    text encoder written by 5.x misses all of them): the loader stops instead, naming the folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    from harness.diffusion.backbone import load
    from harness.errors import WeightsError

    folder = tmp_path / "model"
    shutil.copytree(sd15_rehearsal, folder)
    weights_file = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights_file))
    dropped = sorted(k for k in tensors if "layer_norm1" in k)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"text_encoder: 1 of CLIPTextModel's weights are not in its checkpoint"):
        load(folder)
