"""Generation metrics against independent references: brute-force LPIPS, lpips itself, torch-fidelity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import read_category
from harness.metrics.fidelity import InceptionFeatures, frechet_distance, inception_score, kernel_distance, random_inception_weights
from harness.metrics.iclpips import ICLPIPSConfig, ic_lpips, ic_lpips_bruteforce, member_order, preset, select_members
from harness.metrics.lpips_net import LPIPSNet, load_lpips_image
from harness.metrics.paired import PSNR_CAP, mask_iou, psnr_outside
from harness.metrics.score import METRICS, ScoreConfig, Scorer, ScoreInputs


@pytest.fixture(scope="module")
def images(synth_root):
    """Defect images of three categories (generated stand-ins) and one training defect per category (centres)."""
    generated, centres = [], []
    for name, defect in (("washer", "crack"), ("pill", "color"), ("weave", "stain")):
        samples = read_category(synth_root, name).defects[defect]
        centres.append(samples[0].image)
        generated += [s.image for s in samples[1:]]
    return generated, centres


@pytest.fixture(scope="module")
def vgg():
    return LPIPSNet("vgg")


@pytest.fixture(scope="module")
def alex():
    return LPIPSNet("alex")


def test_cached_ic_lpips_equals_bruteforce_vgg(vgg, images):
    generated, centres = images
    config = ICLPIPSConfig(size=64, cluster_cap=4, seed=1)
    fast, slow = ic_lpips(vgg, generated, centres, config, batch_size=4), ic_lpips_bruteforce(vgg, generated, centres, config)
    assert np.array_equal(fast.assignment, slow.assignment)
    assert sum(v is not None for v in slow.cluster_values) >= 2  # several clusters are exercised
    assert abs(fast.value - slow.value) < 1e-5
    assert np.allclose(fast.nearest, slow.nearest, atol=1e-5)


def test_cached_ic_lpips_equals_bruteforce_dfmgan_variant(alex, images, monkeypatch):
    generated, centres = images
    monkeypatch.setenv("DEFECTBENCH_LPIPS_MEMORY_GB", "0.001")  # most member features wait on disk
    config = preset("ic_lpips_dfmgan", cluster_cap=5)
    fast, slow = ic_lpips(alex, generated, centres, config), ic_lpips_bruteforce(alex, generated, centres, config)
    assert abs(fast.value - slow.value) < 1e-5
    for a, b in zip(fast.cluster_values, slow.cluster_values):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5)


def test_cluster_sampling_is_seeded_and_capped():
    assignment = np.array([0] * 30 + [1] * 3 + [2])
    members = select_members(assignment, 3, 5, member_order(34, "random", 7))
    assert [len(m) for m in members] == [5, 3, 1]
    assert members == select_members(assignment, 3, 5, member_order(34, "random", 7))
    assert members[0] != select_members(assignment, 3, 5, member_order(34, "random", 8))[0]
    assert select_members(assignment, 3, 5, member_order(34, "first", 0))[0] == [0, 1, 2, 3, 4]


def test_ic_lpips_leaves_out_small_clusters(alex, images):
    generated, centres = images
    result = ic_lpips(alex, generated[:1], centres, ICLPIPSConfig(net="alex", size=64))
    assert np.isnan(result.value) and result.clusters_used == 0
    zero = ic_lpips(alex, generated[:1], centres, ICLPIPSConfig(net="alex", size=64, small_clusters="zero"))
    assert zero.value == 0.0


def test_feature_distances_equal_lpips_forward(vgg, images):
    generated, _ = images
    batch = torch.stack([load_lpips_image(p, 64) for p in generated[:5]])
    features = vgg.features(batch)
    matrix = vgg.distances(features, features)
    for i in range(5):
        for j in range(5):
            reference = vgg.model(batch[i:i + 1], batch[j:j + 1]).item()
            assert abs(matrix[i, j].item() - reference) < 1e-5


def test_spatial_map_equals_lpips_spatial(vgg, images):
    import lpips

    generated, _ = images
    a = torch.stack([load_lpips_image(p, 64) for p in generated[:2]])
    b = torch.stack([load_lpips_image(p, 64) for p in generated[2:4]])
    spatial = lpips.LPIPS(net="vgg", pnet_rand=True, spatial=True, verbose=False)
    spatial.load_state_dict(vgg.model.state_dict())
    reference = spatial.eval()(a, b)[:, 0]
    ours = vgg.spatial_map(vgg.features(a), vgg.features(b), (64, 64))
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures("tiny")


def test_fid_of_a_set_against_itself_is_zero(inception, images):
    generated, _ = images
    features = inception.extract(generated[:12], 64)["pool"]
    assert abs(frechet_distance(features, features)["value"]) < 1e-3
    other = inception.extract(images[0][-3:] + images[1], 64)["pool"]
    assert frechet_distance(features, other)["value"] > 1e-3


@pytest.mark.parametrize("n_generated,n_real,dims", [(3, 5, 2048), (40, 12, 2048), (2, 2, 2048), (30, 40, 16)])
def test_low_rank_fid_equals_eigenvalue_fid_and_torch_fidelity(n_generated, n_real, dims):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = torch.Generator().manual_seed(n_generated)
    generated = torch.rand(n_generated, dims, generator=rng, dtype=torch.float64) * 2
    real = torch.rand(n_real, dims, generator=rng, dtype=torch.float64) + 0.3
    ours = frechet_distance(generated, real)["value"]
    one, two = fid_features_to_statistics(generated), fid_features_to_statistics(real)
    eigenvalues = np.linalg.eigvals(one["sigma"] @ two["sigma"]).real
    kept = eigenvalues[eigenvalues > 1e-9 * eigenvalues.max()]  # the rank-deficient product's true nonzero part
    diff = one["mu"] - two["mu"]
    exact = diff @ diff + np.trace(one["sigma"]) + np.trace(two["sigma"]) - 2 * np.sqrt(kept).sum()
    assert ours == pytest.approx(exact, rel=1e-9)
    theirs = fid_statistics_to_metric(one, two, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-3)


def test_fid_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.rand(1, 8), torch.rand(5, 8))


def test_kid_works_with_ten_images(inception, images):
    generated, _ = images
    a = inception.extract(generated[:10], 64)["pool"]
    b = inception.extract(generated[5:15], 64)["pool"]
    kid = kernel_distance(a, b, subset_size=1000)
    assert kid["subset_size"] == 10 and np.isfinite(kid["value"]) and np.isfinite(kid["std"])


def test_is_of_copies_of_one_image_is_one(inception, images):
    logits = inception.extract([images[0][0]] * 12, 64)["logits"]
    assert inception_score(logits)["value"] == pytest.approx(1.0, abs=1e-6)


def test_fidelity_metrics_equal_torch_fidelity(tmp_path, inception, images):
    """Our one-pass IS/FID/KID equal torch-fidelity's own calculate_metrics on the same folders and weights."""
    import torch_fidelity

    generated, centres = images
    gen_dir, real_dir = tmp_path / "gen", tmp_path / "real"
    for folder, paths in ((gen_dir, generated), (real_dir, generated[3:] + centres)):
        folder.mkdir()
        for i, path in enumerate(paths):
            Image.open(path).convert("RGB").save(folder / f"{i:03d}.png")
    scorer = Scorer("tiny", ScoreConfig(resolution=64, metrics=("is", "fid", "kid")))
    ours = {v.metric: v for v in scorer.score(ScoreInputs.from_folder(gen_dir, sorted(real_dir.glob("*.png"))))}
    theirs = torch_fidelity.calculate_metrics(
        input1=str(gen_dir), input2=str(real_dir), isc=True, fid=True, kid=True, cuda=False, verbose=False,
        feature_extractor_weights_path=str(random_inception_weights(0)), isc_splits=ours["is"].details["splits"],
        kid_subset_size=ours["kid"].details["subset_size"], save_cpu_ram=True)
    assert ours["is"].value == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["fid"].value == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)  # see frechet_distance
    assert ours["kid"].value == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5, abs=1e-9)


def test_background_fidelity_and_mask_alignment():
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:20] = True
    inside_only = normal.copy()
    inside_only[mask] = 255 - normal[mask]
    assert psnr_outside(inside_only, normal, mask) == PSNR_CAP
    assert mask_iou(inside_only, normal, mask) > 0.9
    noisy = np.clip(inside_only.astype(int) + rng.integers(-20, 21, normal.shape), 0, 255).astype(np.uint8)
    assert psnr_outside(noisy, normal, mask) < 40
    assert mask_iou(inside_only, normal, np.roll(mask, 12, axis=1)) < 0.5


def test_bg_psnr_is_capped_at_100_db_and_the_record_says_when(tmp_path):
    """README: capped at 100 dB, reached by an identical background and by one a single grey level away (uncapped
    101 dB, above the identical one); the record marks the cap and says which; a visible change is not capped."""
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[100:120, 100:120] = True
    identical = normal.copy()
    identical[mask] = 255 - normal[mask]
    one_level = identical.copy()
    one_level[0, 0, 0] = normal[0, 0, 0] ^ 1  # one value outside the mask, one grey level away
    noisy = np.clip(identical + rng.integers(-3, 4, normal.shape), 0, 255).astype(np.uint8)
    Image.fromarray(normal).save(tmp_path / "normal.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert 10 * np.log10(255 ** 2 * (~mask).sum() * 3) > PSNR_CAP  # one_level's PSNR, uncapped
    scorer = Scorer("tiny", ScoreConfig(resolution=256, metrics=("bg_psnr",)))
    found = {}
    for name, image in (("identical", identical), ("one_level", one_level), ("noisy", noisy)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        inputs = ScoreInputs([tmp_path / f"{name}.png"], masks=[tmp_path / "mask.png"], normals=[tmp_path / "normal.png"])
        (value,) = scorer.score(inputs)
        found[name] = (value.value, value.details["capped"], value.details["identical"])
    assert found["identical"] == (PSNR_CAP, True, True) and found["one_level"] == (PSNR_CAP, True, False)
    assert found["noisy"][0] < 50 and found["noisy"][1:] == (False, False)


def test_a_plain_folder_is_read_in_generation_order(tmp_path):
    """Samples named 0.png ... 11.png come back as 0, 1, 2, ..., 11 (not 0, 1, 10, 11, 2, ...), masks paired."""
    from harness.metrics.score import images_in

    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "image" / f"{i}.png")
        Image.new("L", (8, 8), 255).save(tmp_path / "mask" / f"{i}.png")
    order = [f"{i}.png" for i in range(12)]
    inputs = ScoreInputs.from_folder(tmp_path)
    assert [p.name for p in inputs.generated] == order and [m.name for m in inputs.masks] == order
    assert [p.name for p in images_in(tmp_path / "image")] == order


def test_scorer_reports_every_metric_with_provenance(tmp_path, synth_root):
    from harness.data.splits import make_split
    from harness.generation import fit_method, generate_to
    from harness.methods import load_method
    from harness.tasks import build_task

    split = make_split(read_category(synth_root, "pill"))
    method = load_method("draem")
    task = build_task(split, ["crack"], 64, 0)
    fit_method(method, task, tmp_path / "fit")
    out = generate_to(method, task, "crack", 6, 0, tmp_path / "gen", tmp_path / "fit", progress=False)
    parts = split.defects["crack"]
    inputs = ScoreInputs.from_folder(out, [s.image for s in parts.test], [s.image for s in parts.centres])
    scored, rows = Scorer("tiny", ScoreConfig(resolution=64, ic_lpips=ICLPIPSConfig(size=64))).score_per_image(inputs)
    values = {v.metric: v for v in scored}
    assert set(values) == set(METRICS)
    for metric, column in (("bg_lpips", "bg_lpips"), ("mask_iou", "mask_iou"), ("lpips_to_real", "lpips_to_centre")):
        assert np.nanmean([row[column] for row in rows]) == pytest.approx(values[metric].value)  # the per-image rows
    assert len(rows) == 6 and all(row["nearest_centre"] in {f"crack/{s.image.name}" for s in parts.centres} for row in rows)
    assert values["bg_psnr"].value == PSNR_CAP  # DRAEM leaves the background untouched
    assert values["mask_iou"].value > 0.3
    assert values["fid"].details["random"] and values["ic_lpips"].details["random"]
    assert values["kid"].details["subset_size"] == 4


def test_samples_released_as_image_and_mask_folders_are_scored(synth_root, tmp_path):
    """AnomalyDiffusion and DualAnoDiff release their samples as <defect>/image/N.jpg beside <defect>/mask/N.jpg (or
    .png): `defectbench score` pairs each image with its mask by name and scores them."""
    from PIL import Image

    from harness.data.images import read_mask
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.metrics.iclpips import ICLPIPSConfig
    from harness.metrics.score import METRICS, ScoreConfig, Scorer, ScoreInputs

    parts = make_split(read_category(synth_root, "pill")).defects["crack"]
    released = tmp_path / "pill" / "crack"
    (released / "image").mkdir(parents=True)
    (released / "mask").mkdir()
    chosen = parts.test[:6]
    for index, sample in enumerate(chosen):
        Image.open(sample.image).convert("RGB").save(released / "image" / f"{index}.png")
        mask = np.asarray(Image.open(sample.masks[0]).convert("L"))
        Image.fromarray(mask).save(released / "mask" / f"{index}.jpg", quality=75)  # JPEG: not exactly 0 / 255
    inputs = ScoreInputs.from_folder(released, [s.image for s in parts.test], [s.image for s in parts.centres])
    assert [m.name for m in inputs.masks] == [f"{i}.jpg" for i in range(len(chosen))] and len(chosen) >= 3
    assert np.array_equal(read_mask(inputs.masks[0]), read_mask(parts.test[0].masks[0]))  # re-binarised
    values = {v.metric: v for v in Scorer("tiny", ScoreConfig(resolution=64, ic_lpips=ICLPIPSConfig(size=64))).score(inputs)}
    assert set(values) == set(METRICS) and values["kid"].n == len(chosen) and values["ic_lpips"].value is not None
    assert values["bg_psnr"].value is None and "normal" in values["bg_psnr"].missing  # no normal images released
