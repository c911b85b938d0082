"""The published evaluation (`*_compat` metrics) against transcriptions of the authors' own rules.

Each transcription below restates, line by line in plain NumPy / torch / scikit-learn, what the published script
does (AnomalyDiffusion's and DualAnoDiff's test-localization.py, unet_utils/data_loader.py and
unet_utils/au_pro_util.py, DFMGAN's metrics/lpips.py); our implementation is written differently and must give the
same numbers. Where our own rule differs, a test shows the difference on a case built to expose it.
"""
from __future__ import annotations

import bisect

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from harness.data.images import read_mask_levels
from harness.metrics import detection as det


# ---- transcriptions ---------------------------------------------------------------------------------------


def published_image_score(anomaly_map: np.ndarray) -> float:
    """np.max(avg_pool2d(out_mask_sm[:, 1:, :, :], 21, stride=1, padding=21 // 2)): torch's defaults."""
    tensor = torch.from_numpy(anomaly_map.astype(np.float32))[None, None]
    return float(np.max(F.avg_pool2d(tensor, 21, stride=1, padding=21 // 2).numpy()))


def published_pixel_f1(gt: np.ndarray, scores: np.ndarray) -> float:
    """Their loop: thresholds np.arange(0.0, 1.0 + 1e-3, 0.05), `score > t`, counts with eps 1e-8."""
    gt = gt.ravel().astype(np.bool_)
    scores = scores.ravel()
    best = -99
    for threshold in np.arange(0.0, 1.0 + 1e-3, 0.05):
        predicted = scores > threshold
        intersection = np.logical_and(gt, predicted).sum()
        precision = intersection / (predicted.sum() + 1e-8)
        recall = intersection / (gt.sum() + 1e-8)
        f1 = 2 * precision * recall / (precision + recall + 1e-8)
        best = max(best, f1)
    return float(best)


def published_au_pro(gt_maps: list[np.ndarray], anomaly_maps: list[np.ndarray], limit=0.3, num_thresholds=100):
    """MVTec 3D-AD's calculate_au_pro as their au_pro_util.py runs it: components per image (8-connected, any
    non-zero ground truth), normal pixels sorted, thresholds at np.linspace(0, N - 1, 100, dtype=int), PRO by
    counting a component's scores above the threshold, (1, 1) prepended, lists reversed, trapezoid to 0.3 with a
    bisect-interpolated end point, divided by 0.3."""
    ok, components = [], []
    for gt, amap in zip(gt_maps, anomaly_maps):
        labelled, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=int))
        ok.extend(amap[labelled == 0].tolist())
        for k in range(1, n + 1):
            components.append(np.sort(amap[labelled == k]))
    ok = np.sort(np.array(ok))
    fprs, pros = [1.0], [1.0]
    for position in np.linspace(0, len(ok) - 1, num=num_thresholds, dtype=int):
        threshold = ok[position]
        fprs.append(1.0 - (position + 1) / len(ok))
        pros.append(float(np.mean([np.sum(c > threshold) / len(c) for c in components])))
    x, y = fprs[::-1], pros[::-1]
    # their trapezoid: points up to the limit, plus the interpolated value at the limit
    i = bisect.bisect_left(x, limit)
    area = sum((x[k + 1] - x[k]) * (y[k + 1] + y[k]) / 2 for k in range(i - 1))
    if i < len(x) and x[i] != limit and i > 0:
        y_limit = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        area += (limit - x[i - 1]) * (y_limit + y[i - 1]) / 2
    elif i < len(x) and x[i] == limit:
        area += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
    return area / limit


def published_gt(mask_path, size: int) -> np.ndarray:
    """Their loader: cv2.imread(mask, IMREAD_GRAYSCALE), cv2.resize(..., dsize=(size, size)), / 255.0."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(mask, dsize=(size, size)) / 255.0


# ---- the image score --------------------------------------------------------------------------------------


def test_image_score_with_padding_counted_equals_their_pooling():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 48, 48)).astype(np.float32)
    ours = det.image_scores_from_maps(maps, 21, count_include_pad=True)
    assert np.allclose(ours, [published_image_score(m) for m in maps], atol=1e-7)


def test_border_defects_score_lower_under_the_published_pooling():
    """A corner defect against a centred blob on a normal image: padding counted flips the ranking."""
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, :8, :8] = 1.0  # the anomalous image: a defect in the corner
    maps[1, 26:38, 26:38] = 1.0  # the normal image: a false alarm in the middle
    ours = det.image_scores_from_maps(maps)
    published = det.image_scores_from_maps(maps, count_include_pad=True)
    assert ours[0] == pytest.approx(64 / 121) and published[0] == pytest.approx(64 / 441)
    labels = np.array([1, 0])
    assert det.auroc(labels, ours) == 1.0 and det.auroc(labels, published) == 0.0


# ---- pixel F1-max -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_f1_equals_their_loop(seed):
    rng = np.random.default_rng(seed)
    gt = rng.random((4, 16, 16)) < 0.1
    scores = np.clip(rng.random((4, 16, 16)) * 0.6 + 0.4 * gt, 0, 1)
    assert det.f1_max_compat(gt, scores) == pytest.approx(published_pixel_f1(gt, scores), abs=1e-12)


def test_pixel_f1_on_raw_maps_cannot_cut_between_close_scores():
    """Maps in [0.31, 0.34]: no threshold of 0, 0.05, ... falls between the normal and the defect pixels, so the
    published F1 predicts everything (2/3) where the exact F1-max separates them (1)."""
    gt = np.array([0, 0, 1, 1], bool)
    scores = np.array([0.31, 0.32, 0.33, 0.34])
    assert det.f1_max_compat(gt, scores) == pytest.approx(published_pixel_f1(gt, scores))
    assert det.f1_max_compat(gt, scores) == pytest.approx(2 / 3, abs=1e-6)
    assert det.f1_max(gt, scores) == 1.0


# ---- AUPRO ------------------------------------------------------------------------------------------------


def _maps_with_soft_masks(seed: int, n: int = 6, size: int = 32):
    rng = np.random.default_rng(seed)
    levels = np.zeros((n, size, size), np.uint8)
    for i in range(n // 2):
        y, x = rng.integers(2, size - 10, 2)
        levels[i, y:y + rng.integers(3, 8), x:x + rng.integers(3, 8)] = 255
        levels[i] = cv2.GaussianBlur(levels[i], (3, 3), 0.8)  # partly covered border pixels
    maps = rng.random((n, size, size)) * 0.7 + 0.5 * (levels / 255.0)
    return levels, np.round(maps, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_equals_calculate_au_pro(seed):
    levels, maps = _maps_with_soft_masks(seed)
    theirs = published_au_pro([lv / 255.0 for lv in levels], list(maps))
    assert det.aupro_compat(levels, maps) == pytest.approx(theirs, abs=1e-12)
    exact = det.aupro(levels != 0, maps)
    assert 0 < abs(det.aupro_compat(levels, maps) - exact) < 0.05  # 100 thresholds: close, not equal


# ---- ground truth ---------------------------------------------------------------------------------------


def test_mask_levels_and_pixel_metrics_follow_their_loader(tmp_path):
    mask = np.zeros((50, 50), np.uint8)
    mask[10:23, 17:33] = 255
    path = tmp_path / "000_mask.png"
    Image.fromarray(mask).save(path)
    levels = read_mask_levels([path], 32)
    theirs = published_gt(path, 32)
    assert np.array_equal(levels / 255.0, theirs)
    assert ((levels > 0) & (levels < 255)).any()  # the resize leaves partly covered pixels
    rng = np.random.default_rng(0)
    stack = np.stack([levels, np.zeros_like(levels)])  # a defect image and a normal image
    gts = [theirs, np.zeros_like(theirs)]
    maps = rng.random((2, 32, 32)) + (stack > 0)
    gt_auroc = np.concatenate([g.astype(np.uint8).ravel() for g in gts])  # astype(uint8): fully covered only
    values = det.compat_metrics(np.array([True, False]), np.array([1.0, 0.0]), stack, maps)
    assert values["pixel_auroc_compat"] == pytest.approx(roc_auc_score(gt_auroc, maps.ravel()), abs=1e-12)
    assert values["pixel_ap_compat"] == pytest.approx(average_precision_score(gt_auroc, maps.ravel()), abs=1e-12)
    assert values["pixel_aupro_compat"] == pytest.approx(published_au_pro(gts, list(maps)), abs=1e-12)
    # our own rule (bilinear, >= 0.5) counts the half-covered pixels as defect pixels: a different number
    assert values["pixel_auroc_compat"] != pytest.approx(det.auroc(stack >= 128, maps), abs=1e-6)


# ---- test images -------------------------------------------------------------------------------------------


def published_test_image(path, size: int) -> np.ndarray:
    """Their test loader, cv2.imread(path, IMREAD_COLOR) and cv2.resize(..., dsize=(size, size)), then their test
    loop's gray_batch[:, [2, 1, 0]] (OpenCV's BGR to RGB)."""
    image = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), dsize=(size, size))
    return image[:, :, [2, 1, 0]]


def test_compat_test_images_are_read_as_their_loader_reads_them(tmp_path, synth_root):
    from harness.data.images import read_image_cv2
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.downstream.data import test_samples, test_set

    colours = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)  # not square, sharp detail
    path = tmp_path / "000.png"
    Image.fromarray(colours).save(path)
    assert np.array_equal(read_image_cv2(path, 32), published_test_image(path, 32))
    split = make_split(read_category(synth_root, "weave", dataset="synthetic"))
    samples = test_samples(split)
    published, ours = test_set(split, 32, "cv2-bilinear"), test_set(split, 32)
    assert np.array_equal(published.images, np.stack([published_test_image(s.image, 32) for s in samples]))
    # the default is unchanged: PIL's antialiased bicubic, a different image
    pil = [np.asarray(Image.open(s.image).convert("RGB").resize((32, 32), Image.BICUBIC)) for s in samples]
    assert np.array_equal(ours.images, np.stack(pil)) and not np.array_equal(ours.images, published.images)
    assert np.array_equal(ours.masks, published.masks) and np.array_equal(ours.mask_levels, published.mask_levels)


# ---- DFMGAN's IC-LPIPS ------------------------------------------------------------------------------------


def dfmgan_clpips(loss_fn, generated, centres, cap: int = 200) -> float:
    """DFMGAN's metrics/lpips.py: centres as uint8 tensors straight from the data loader (never scaled), each
    generated image in [-1, 1] assigned to its argmin centre (dropped when that cluster holds `cap`), the mean
    over all ordered pairs of a cluster (batch rolled by 1..n-1), small clusters 0, mean over every cluster."""
    data_list = torch.cat([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None]
                           for p in centres])
    clusters: list[list[torch.Tensor]] = [[] for _ in centres]
    with torch.no_grad():
        for path in generated:
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            gen = torch.from_numpy(image).permute(2, 0, 1)[None]
            k = int(torch.argmin(loss_fn(gen.repeat(len(centres), 1, 1, 1), data_list).flatten()))
            if len(clusters[k]) < cap:
                clusters[k].append(gen)
        values = []
        for members in clusters:
            n = len(members)
            if n <= 1:
                values.append(0.0)
                continue
            batch = torch.cat(members)
            total = sum(float(loss_fn(batch.roll(shift, 0), batch).sum()) for shift in range(1, n))
            values.append(total / (n * (n - 1)))
    return float(np.mean(values))


def test_dfmgan_preset_reproduces_their_code_and_the_fixed_one_does_not(synth_root):
    from harness.data import read_category
    from harness.metrics.iclpips import ic_lpips, preset
    from harness.metrics.lpips_net import LPIPSNet

    generated, centres = [], []
    for defect, samples in read_category(synth_root, "washer").defects.items():  # centres of one category: close
        centres += [s.image for s in samples[:2]]
        generated += [s.image for s in samples[2:]]
    net = LPIPSNet("alex")
    theirs = dfmgan_clpips(net.model, generated, centres)
    buggy = ic_lpips(net, generated, centres, preset("ic_lpips_dfmgan"))
    fixed = ic_lpips(net, generated, centres, preset("ic_lpips_dfmgan_fixed"))
    assert buggy.value == pytest.approx(theirs, abs=1e-5)
    assert not np.array_equal(fixed.assignment, buggy.assignment)  # the centres' range changes the assignment ...
    assert abs(fixed.value - theirs) > 1e-3  # ... and the value
