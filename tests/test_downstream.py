"""Downstream models and detectors: the loss, the schedule, the sampling, model selection, every detector, weights,
and a sanity check that the pipeline measures something."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.layouts import read_category
from harness.data.splits import make_split
from harness.downstream import classification, data, detectors, segmentation
from harness.downstream.config import model_config
from harness.errors import ConfigError

RES = 128


@pytest.fixture(scope="module")
def weave(synth_root):
    return make_split(read_category(synth_root, "weave", dataset="synthetic"))


def test_focal_loss_matches_kornia():
    from kornia.losses import focal_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8) * 3
    target = (torch.rand(3, 8, 8) > 0.7).long()
    # kornia's "mean" also averages over the class axis (half of DRAEM's per-pixel mean with two classes): sum the
    # per-class terms (only the true class's is non-zero), then average over pixels as DRAEM's FocalLoss does
    reference = focal_loss(logits, target, alpha=None, gamma=2.0, reduction="none").sum(1).mean()
    assert segmentation.focal_loss(logits, target, 2.0).item() == pytest.approx(reference.item(), rel=1e-5)
    # gamma 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert segmentation.focal_loss(logits, target, 0.0).item() == pytest.approx(ce.item(), rel=1e-5)


def test_learning_rate_drops_by_five_at_80_and_90_percent():
    optimiser = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = segmentation.lr_schedule(optimiser, 100)
    rates = []
    for _ in range(100):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    assert rates[79] == pytest.approx(1e-4) and rates[80] == pytest.approx(2e-5)
    assert rates[89] == pytest.approx(2e-5) and rates[90] == pytest.approx(4e-6)


def test_batches_mix_normal_and_generated_half_and_half():
    normal = data.ImageSet(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 8), bool), ["good"] * 4, list("abcd"))
    masks = np.ones((4, 8, 8), bool)
    masks[3] = False  # an empty generated mask: a normal sample
    generated = data.ImageSet(np.full((4, 8, 8, 3), 255, np.uint8), masks, ["x"] * 4, list("efgh"))
    rng = np.random.default_rng(0)
    from_generated, anomalous = 0, 0
    for _ in range(500):
        images, target = segmentation._draw(rng, normal, generated, 8, 0.5)
        from_generated += int((images[:, 0, 0, 0] == 255).sum())
        anomalous += int(target.reshape(8, -1).any(1).sum())
        assert not target[images[:, 0, 0, 0] == 0].any()  # normal images never carry a mask
    assert from_generated / 4000 == pytest.approx(0.5, abs=0.03)
    assert anomalous / 4000 == pytest.approx(0.5 * 3 / 4, abs=0.03)


def test_hold_out_is_per_type_disjoint_and_seeded():
    types = ["a"] * 10 + ["b"] * 5 + ["c"]
    samples = data.ImageSet(np.zeros((16, 4, 4, 3), np.uint8), np.zeros((16, 4, 4), bool), types,
                            [str(i) for i in range(16)])
    train, validation = data.hold_out(samples, 0.2, seed=3)
    assert sorted(train.names + validation.names, key=int) == samples.names
    assert validation.defect_types.count("a") == 2 and validation.defect_types.count("b") == 1
    assert "c" not in validation.defect_types  # one image: kept for training
    assert data.hold_out(samples, 0.2, seed=3)[1].names == validation.names


def test_scores_cover_the_whole_test_part_and_each_defect_type(weave):
    test = data.test_set(weave, 32)
    assert len(test) == sum(len(p.test) for p in weave.defects.values()) + len(weave.normal_test)
    maps = test.masks.astype(float) + 0.01 * np.random.default_rng(0).random(test.masks.shape)
    records = data.score_maps(test, maps, maps.max(axis=(1, 2)))
    by = {(r["defect_type"], r["metric"]): r for r in records}
    assert {d for d, _ in by} == {"all", *weave.defects}
    assert by[("all", "pixel_auroc")]["value"] == pytest.approx(1.0)
    assert by[("all", "pixel_aupro")]["value"] == pytest.approx(1.0)
    assert by[("hole", "image_auroc")]["n"] == len(weave.defects["hole"].test) + len(weave.normal_test)


@pytest.mark.parametrize("select_on", ["validation", "test", "last"])
def test_model_selection_uses_the_configured_part(weave, select_on, monkeypatch):
    seen = []
    original = segmentation.selection_score

    def spy(net, part, config, device):
        seen.append(part.names)
        return original(net, part, config, device)

    monkeypatch.setattr(segmentation, "selection_score", spy)
    generated = data.from_samples([s for p in weave.defects.values() for s in p.train], RES)
    train, validation = data.hold_out(generated, 0.5, 0)
    test = data.test_set(weave, RES)
    config = model_config("segmentation", "tiny", {"epochs": 2, "base_width": 4, "select_on": select_on})
    maps, scores, selection = segmentation.run(data.normal_set(weave, "train", RES), data.normal_set(weave, "validation", RES),
                                               train, validation, test, config, seed=0)
    assert maps.shape == test.masks.shape and scores.shape == (len(test),)
    assert selection.on == select_on
    if select_on == "last":
        assert seen == [] and selection.best_epoch == 2
        return
    expected = test.names if select_on == "test" else validation.names + [s.key for s in weave.normal_validation]
    assert seen == [expected, expected]  # after each epoch
    assert not set(expected) & set(train.names)
    assert selection.best_epoch in (1, 2) and len(selection.history) == 2


def test_the_tiny_u_net_trains_in_mixed_precision_and_the_paper_one_in_float32(weave, monkeypatch):
    """`autocast`: `auto` in `tiny` (bf16 where the CPU computes it natively, here pretended so that the test runs
    on any CPU: 1.6x faster per step on one that does), float32 in `paper` (DRAEM's); the weights stay in float32
    and the arithmetic differs; a wrong type is an error naming the key."""
    from harness import device

    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: True)
    assert model_config("segmentation", "paper")["autocast"] == "float32"
    assert model_config("segmentation", "tiny")["autocast"] == "auto"
    generated = data.from_samples([s for p in weave.defects.values() for s in p.train], RES)
    normal = data.normal_set(weave, "train", RES)
    nets = {}
    for kind in ("float32", "auto"):
        config = model_config("segmentation", "tiny", {"epochs": 1, "base_width": 4, "autocast": kind})
        nets[kind], _ = segmentation.train(normal, generated, config, seed=0)
    weights = {k: torch.cat([p.detach().flatten() for p in net.parameters()]) for k, net in nets.items()}
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert not torch.equal(weights["float32"], weights["auto"])
    with pytest.raises(ValueError, match="autocast must be one of"):
        segmentation.train(normal, generated, model_config("segmentation", "tiny", {"epochs": 1, "base_width": 4,
                                                                                   "autocast": "int8"}), seed=0)
    from harness.downstream.config import parse_models
    from harness.errors import ConfigError

    for wrong in ("float16", "bfloat16"):  # bfloat16 unconditionally would be emulated, 18x slower, on AVX2 CPUs
        with pytest.raises(ConfigError, match=rf"downstream\[0\]\.config\.autocast: '{wrong}'; choose from auto"):
            parse_models([{"name": "segmentation", "config": {"autocast": wrong}}], "suite.yaml", "downstream", "tiny")


def _noise_defects(normal: data.ImageSet, n: int, seed: int) -> data.ImageSet:
    """Random-noise 'defects': uniform noise in random rectangles of normal images."""
    rng = np.random.default_rng(seed)
    images, masks = normal.images[:n].copy(), np.zeros((n, RES, RES), bool)
    for i in range(n):
        y, x = rng.integers(0, RES - 30, 2)
        h, w = rng.integers(8, 28, 2)
        images[i, y:y + h, x:x + w] = rng.integers(0, 256, (h, w, 3))
        masks[i, y:y + h, x:x + w] = True
    return data.ImageSet(images, masks, ["noise"] * n, [f"noise/{i}" for i in range(n)])


def test_sanity_real_defects_train_a_better_unet_than_noise(tmp_path):
    """The pipeline measures something: a U-Net trained on the real training anomalies localises the real test
    defects far better (pixel AP) than one trained on random-noise rectangles."""
    from harness.data.synth import SynthConfig, synthesize

    root = synthesize(tmp_path / "synth", SynthConfig(seed=1, size=RES, n_train=40, n_validation=6, n_test_good=10,
                                                      n_defect=15))
    split = make_split(read_category(root, "weave", dataset="synthetic"))
    test = data.test_set(split, RES)
    normal, normal_val = data.normal_set(split, "train", RES), data.normal_set(split, "validation", RES)
    real = data.from_samples([s for p in split.defects.values() for s in p.train], RES)
    config = model_config("segmentation", "tiny", {"epochs": 8})  # measured: real 0.258 vs noise 0.080 pixel AP (bf16; float32: 0.243 vs 0.075)
    results = {}
    for name, generated in (("real", real), ("noise", _noise_defects(normal, len(real), 0))):
        train, validation = data.hold_out(generated, config["validation_fraction"], 0)
        maps, scores, _ = segmentation.run(normal, normal_val, train, validation, test, config, seed=0)
        results[name] = {r["metric"]: r["value"] for r in data.score_maps(test, maps, scores) if r["defect_type"] == "all"}
    print({k: round(v["pixel_ap"], 3) for k, v in results.items()})
    assert results["real"]["pixel_ap"] > 2 * results["noise"]["pixel_ap"]
    assert results["real"]["pixel_ap"] - results["noise"]["pixel_ap"] > 0.05


def test_classifier_reports_accuracy_over_the_whole_test_part(weave):
    generated = data.from_samples([s for p in weave.defects.values() for s in p.train], 64)
    train, validation = data.hold_out(generated, 0.3, 0)
    test = data.test_set(weave, 64)
    config = model_config("classification", "tiny", {"epochs": 2})
    result, resolved = classification.run(train, validation, test, sorted(weave.defects), config, "tiny", 0)
    truth = [t for _, t, _ in result["predictions"]]
    assert result["n"] == len(truth) == sum(len(p.test) for p in weave.defects.values())
    correct = sum(t == p for _, t, p in result["predictions"])
    assert result["accuracy"] == pytest.approx(correct / len(truth))
    assert list(result["per_class"]) == sorted(weave.defects)
    assert resolved.is_random
    with pytest.raises(ValueError, match="sorted"):
        classification.run(train, validation, test, ["stain", "hole"], config, "tiny", 0)


def test_classifier_and_detectors_load_weights_from_a_file(tmp_path):
    import torchvision

    torch.manual_seed(123)
    resnet34, resnet18 = tmp_path / "r34.pth", tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet34().state_dict(), resnet34)
    torch.save(torchvision.models.resnet18().state_dict(), resnet18)
    expected34 = torch.load(resnet34)["conv1.weight"]
    net, resolved = classification.build_classifier(3, "paper", str(resnet34))
    assert resolved.source == "config" and torch.equal(net.conv1.weight, expected34)
    assert net.fc.out_features == 3
    expected18 = torch.load(resnet18)["layer1.0.conv1.weight"]
    for name in ("patchcore", "padim", "cfa", "reverse_distillation", "supersimplenet"):
        config = model_config(name, "tiny")
        model, resolved = detectors.build(name, config, 64, "paper", str(resnet18), tmp_path / name)
        trunks = detectors.backbone_modules(model)
        assert resolved.source == "config" and trunks, name
        assert all(torch.equal(t.state_dict()["layer1.0.conv1.weight"], expected18) for t in trunks), name


@pytest.mark.parametrize("name", detectors.DETECTORS)
def test_every_detector_trains_offline_and_maps_the_test_part(weave, name, tmp_path):
    config = model_config(name, "tiny", {"max_epochs": 1})
    test = data.test_set(weave, RES)
    maps, scores, resolved = detectors.run(name, data.normal_set(weave, "train", RES), test, config, RES, "tiny", 0,
                                           tmp_path)
    assert maps.shape == (len(test), RES, RES) and scores.shape == (len(test),)
    assert np.isfinite(maps).all() and np.isfinite(scores).all() and maps.std() > 0
    assert (resolved is None) == (name == "draem")
    records = data.score_maps(test, maps, scores)
    assert {r["metric"] for r in records} >= {"image_auroc", "pixel_ap", "pixel_aupro"}


@pytest.mark.parametrize("change,message", [
    ({"detectors": ["patchcroe"]}, "unknown detector 'patchcroe'"),
    ({"downstream": ["segmentaton"]}, "unknown downstream model 'segmentaton'"),
    ({"downstream": [{"name": "segmentation", "config": {"epoch": 3}}]}, "downstream[0].config: "),
    ({"downstream": [{"name": "segmentation", "config": {"select_on": "train"}}]}, "select_on: 'train'"),
    ({"detectors": ["padim", "padim"]}, "listed twice"),
])
def test_bad_downstream_settings_name_the_key(change, message):
    from harness.runner.suite import parse_suite
    from tests.test_runner import mini

    with pytest.raises(ConfigError) as info:
        parse_suite(mini(**change), None)
    assert message in str(info.value)


def test_a_compat_protocol_segments_and_detects_on_test_images_read_as_published():
    """Under a compat protocol the segment and detect jobs read the test images with OpenCV, as the published
    localisation code, named in their keys; classify jobs (their classification code reads with PIL) and every job
    of another protocol keep ours and their keys."""
    import yaml

    from harness.runner.plan import expand, prepare
    from harness.runner.suite import parse_suite
    from tests.test_runner import REPO

    raw = yaml.safe_load((REPO / "tests" / "suites" / "downstream.yaml").read_text())

    def downstream(protocol: str) -> list:
        jobs = expand(prepare(parse_suite({**raw, "protocol": protocol}, None)))
        return [job for job in jobs if job.kind in ("segment", "classify", "detect")]

    compat = downstream("anomalydiffusion")
    assert {job.kind for job in compat} == {"segment", "classify", "detect"}
    for job in compat:
        assert job.params.test_images == (None if job.kind == "classify" else "cv2-bilinear"), job.label
    assert all("test_images" not in job.as_dict()["params"] for job in downstream("clean-thirds"))


@pytest.mark.slow  # 42 s: make test keeps within its 15 minutes
def test_suite_runs_downstream_and_detectors_and_renders_their_tables(tmp_path):
    import yaml

    from harness.report.leaderboard import render_leaderboard
    from harness.results import run_records
    from harness.runner.run import run_suite
    from harness.runner.suite import load_suite
    from tests.test_runner import REPO

    suite_file = REPO / "tests" / "suites" / "downstream.yaml"
    result = run_suite(load_suite(suite_file), executor="serial", results=tmp_path, progress=False)
    assert set(result.states.values()) == {"done"}
    kinds = [job.kind for job in result.plan.jobs]
    assert kinds.count("segment") == 4 and kinds.count("classify") == 4 and kinds.count("detect") == 4
    by_key = result.plan.by_key()
    for job in result.plan.jobs:  # a downstream job needs the generate jobs of every defect type of its category
        if job.kind in ("segment", "classify"):
            needed = {by_key[d].tags["defect_type"] for d in job.deps}
            assert {by_key[d].kind for d in job.deps} == {"generate"} and len(needed) == len(job.params.generated) >= 2
        if job.kind == "detect":
            assert job.deps == ()
    frame = run_records(result.store)
    whole = frame[frame["defect_type"] == "all"]
    for method in ("cutpaste", "draem", "PatchCore", "PaDiM"):
        for category in ("weave", "tray"):
            got = set(whole[(whole["method"] == method) & (whole["category"] == category)]["metric"])
            assert got >= {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
                           "pixel_aupro", "pixel_f1max_compat"}, (method, category)
    assert set(whole[whole["metric"] == "accuracy"]["method"]) == {"cutpaste", "draem"}
    assert {"logical_anomalies", "structural_anomalies"} <= set(frame[frame["category"] == "tray"]["defect_type"])
    spro = frame[(frame["metric"] == "pixel_spro") & frame["value"].notna()]  # MVTec LOCO's own, for tray only
    assert set(spro["category"]) == {"tray"} and len(spro) == 3 * 4  # logical, structural, all x 4 rows
    md, tex = render_leaderboard("downstream", results=tmp_path, show_reported=False)
    text = md.read_text()
    for title in ("Detection and localisation (all defect types)", "Detection and localisation (logical anomalies)",
                  "Detection and localisation (structural anomalies)", "Localisation per category",
                  "Defect classification accuracy"):
        assert title in text
    assert "_Unsupervised (anomalib, normal images only)_" in text and "†" not in text
    loco_tables = text.split("### Detection and localisation (logical anomalies)")[1].split("### Localisation per")[0]
    assert loco_tables.count("AU-sPRO↑") == 2 and "AU-sPRO" not in text.split("(logical anomalies)")[0]
    assert tex.read_text().count(r"\begin{table}") == text.count("\n### ") - text.count("### Figures")
    _per_image_rows_give_the_records(tmp_path, frame)

    # the published practice, selecting the U-Net on the test part, is marked wherever it is used
    raw = yaml.safe_load(suite_file.read_text())
    raw["downstream"][0]["config"]["select_on"] = "test"
    changed = tmp_path / "downstream.yaml"
    changed.write_text(yaml.safe_dump(raw))
    again = run_suite(load_suite(changed), executor="serial", results=tmp_path, progress=False)
    assert set(again.states.values()) == {"done"}
    text = render_leaderboard("downstream", results=tmp_path, show_reported=False)[0].read_text()
    assert "| cutpaste †" in text and "selected on the test part" in text


def _per_image_rows_give_the_records(results, frame):
    """The exported rows of the segment and detect jobs give their records: image AUROC from the rows' scores and
    labels, each image's pixel AUROC from its own map and mask."""
    import pandas as pd

    from harness.downstream.data import test_set
    from harness.metrics import detection
    from harness.results import export_per_image, load_per_image

    rows = load_per_image("downstream", results=results, kinds=("segment", "detect"))
    assert set(rows["kind"]) == {"segment", "detect"} and not rows.attrs["without_rows"]
    whole = frame[(frame["defect_type"] == "all") & (frame["metric"] == "image_auroc")].set_index("job_key")["value"]
    for key, job in rows.groupby("job_key"):
        assert detection.auroc(job["label"].to_numpy(), job["image_score"].to_numpy()) == pytest.approx(whole[key])
        defective = job[job["label"] == 1]
        assert defective["pixel_auroc"].notna().all() and job[job["label"] == 0]["pixel_auroc"].isna().all()
    one = rows[(rows["label"] == 1)].iloc[0]
    maps = np.load(next(results.glob(f"runs/downstream/*/jobs/{one['job_key']}/maps.npz")))
    index = list(maps["names"]).index(one["image_id"])
    split = make_split(read_category(Path(one["file"]).parents[3], one["category"], dataset="synthetic"))
    mask = test_set(split, maps["maps"].shape[-1]).masks[index]
    assert one["pixel_auroc"] == pytest.approx(detection.auroc(mask, maps["maps"][index].astype(np.float32)))
    summary, out, _ = export_per_image("downstream", results=results, kinds=("segment", "detect"))
    assert sum(r["jobs"] for r in summary) == rows["job_key"].nunique()
    read_back = pd.concat([pd.read_csv(f) for f in sorted(out.glob("*.csv"))], ignore_index=True)
    assert len(read_back) == len(rows) and len(list(out.glob("*.jsonl"))) == len(list(out.glob("*.csv")))
    assert set(read_back.columns) >= {"file", "label", "test_defect_type", "image_score", "pixel_auroc", "pixel_ap"}
