"""What the methods' claim tests measure on generated samples (methods/<name>/tests/ of background_aware,
anomalyxfusion and anomalydiffusion): one definition, so that the claims of two methods read the same numbers."""
from __future__ import annotations

import importlib
import sys

import numpy as np


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by `pixels` in every direction (a square structuring element)."""
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)).astype(bool)


def measure(task, samples, request, cell: int = 4) -> dict[str, float]:
    """Over the samples of one variant, each drawn on its target's normal image inside its target mask:
    - background: PSNR between the sample and the autoencoder's reconstruction of its target normal image, outside
      the target mask grown by one latent cell (`cell` px): a latent method can at best give the reconstruction
      there; the cell leaves out the mask's partly covered cells and most of the decoder's reach across its edge;
    - contrast: mean |sample - normal| inside the target mask over the mean outside it;
    - defect: how far the mean colour inside the masks moved from the normal images' towards the training defects'
      of the request's defect type (1: all the way, 0: not at all; means over all samples, projected on the
      normal-to-defect line)."""
    from harness.diffusion import backbone as backbones
    from harness.diffusion.latents import decode, encode
    from harness.metrics.paired import psnr_from_error, squared_error_outside

    backbone = backbones.load_frozen(task.backbone)
    normals = np.stack([t.normal.image for t in request.targets])
    reconstructions = decode(backbone, encode(backbone, normals))
    error = count = 0.0
    contrast, samples_in, normals_in = [], [], []
    for sample, target, reconstruction in zip(samples, request.targets, reconstructions):
        e, c = squared_error_outside(sample.image, reconstruction, grown(target.mask, cell))
        error, count = error + e, count + c
        diff = np.abs(sample.image.astype(float) - target.normal.image).mean(2)
        contrast.append(diff[target.mask].mean() / max(diff[~target.mask].mean(), 1e-6))
        samples_in.append(sample.image[target.mask].mean(0))
        normals_in.append(target.normal.image[target.mask].mean(0))
    anomalies = task.anomalies_of(request.defect_type)
    defect_colour = np.mean([a.image[a.mask].mean(0) for a in anomalies], axis=0)
    span = defect_colour - np.mean(normals_in, axis=0)
    moved = float(np.dot(np.mean(samples_in, axis=0) - np.mean(normals_in, axis=0), span) / np.dot(span, span))
    return {"background": psnr_from_error(error, count), "contrast": float(np.mean(contrast)), "defect": moved}


def shape_features(masks) -> np.ndarray:
    """Per mask: log of its area (fraction of the image), its centroid's x and y (fractions of the side)."""
    out = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        out.append((np.log(mask.mean()), xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]))
    return np.array(out)


def shape_distance(masks, reference) -> float:
    """The sum over the three features of the 1-D Wasserstein distances between two sets of masks."""
    from scipy.stats import wasserstein_distance

    a, b = shape_features(masks), shape_features(reference)
    return float(sum(wasserstein_distance(a[:, i], b[:, i]) for i in range(a.shape[1])))


def random_ellipses(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Ellipses with uniform centres (10-90 % of the side), semi-axes of 1/40 to 1/4 of the side, any angle."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        a, b = rng.uniform(size / 40, size / 4, 2)
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        out.append((u / a) ** 2 + (v / b) ** 2 <= 1)
    return out


def region_features(image: np.ndarray, mask: np.ndarray, ring: int = 4) -> np.ndarray:
    """What a defect looks like against its surroundings: the mean colour inside the mask minus the mean in a ring
    of `ring` px around it, and the colour's standard deviation inside (6 numbers; the normal image cancels out)."""
    pixels = image.astype(float) / 255
    around = grown(mask, ring) & ~mask
    inside = pixels[mask]
    return np.concatenate([inside.mean(0) - pixels[around].mean(0), inside.std(0)])


def weaker(image: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """The defect at `strength` (1: as it is, 0: gone): inside the mask, blended with the image inpainted over the
    mask grown by one pixel (OpenCV's Telea inpainting), an estimate of the normal surface under it. Float (H, W, 3)."""
    import cv2

    background = cv2.inpaint(np.clip(image, 0, 255).astype(np.uint8), grown(mask, 1).astype(np.uint8), 3,
                             cv2.INPAINT_TELEA)
    out = image.astype(float).copy()
    out[mask] = strength * out[mask] + (1 - strength) * background[mask]
    return out


class DefectTypeClassifier:
    """A defect-type classifier trained on real training anomalies (image, mask, type), with augmentation: each
    anomaly also under flips and quarter turns, at a random strength in [`weakest`, 1] (`weaker`), blurred (a
    Gaussian of sigma up to `softest` px), under brightness and contrast changes (±10%) and pixel noise; logistic
    regression on `region_features`. Strength and blur, because the tiny generators draw defects fainter than the
    real ones (the visible claims ask for a quarter of the colour move) and through an autoencoder that softens them,
    and a classifier that saw only sharp full-strength defects puts faint ones into one class (the caption claim's
    classifier test shows it on real stains at 35 %)."""

    def __init__(self, anomalies, copies: int = 24, seed: int = 0, weakest: float = 0.25, softest: float = 1.5):
        import cv2

        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(seed)
        rows, labels = [], []
        for anomaly in anomalies:
            for _ in range(copies):
                image, mask = anomaly.image.astype(float), anomaly.mask
                turns, flip = rng.integers(4), rng.integers(2)
                image, mask = np.rot90(image, turns), np.rot90(mask, turns)
                if flip:
                    image, mask = image[:, ::-1], mask[:, ::-1]
                image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
                image = weaker(image, mask, rng.uniform(weakest, 1)) if weakest < 1 else image
                image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.01, softest)) if softest > 0 else image
                image = (image - 128) * rng.uniform(0.9, 1.1) + 128 * rng.uniform(0.9, 1.1)
                image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255)
                rows.append(region_features(image, mask))
                labels.append(anomaly.defect_type)
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(np.array(rows), labels)

    def predict(self, images, masks) -> list[str]:
        return list(self.model.predict(np.array([region_features(i, m) for i, m in zip(images, masks)])))


def _smoothed_colours(image: np.ndarray) -> np.ndarray:
    """(H * W, 3) colours after a 3 x 3 mean: a defect is a region, not a pixel's noise."""
    import cv2

    return cv2.blur(image.astype(np.float32), (3, 3)).reshape(-1, 3)


def normal_colours(normals: np.ndarray, sample: int = 4000, seed: int = 0):
    """A k-d tree over `sample` smoothed pixel colours of the normal images (N, H, W, 3): what `outlier_map` measures
    against, built once per set of normals."""
    from scipy.spatial import cKDTree

    pixels = np.concatenate([_smoothed_colours(n) for n in normals])
    return cKDTree(pixels[np.random.default_rng(seed).choice(len(pixels), min(sample, len(pixels)), replace=False)])


def outlier_map(image: np.ndarray, colours, k: int = 5) -> np.ndarray:
    """Per pixel of `image` (H, W, 3): how unlike the normal images' pixels its colour is, the mean distance to its `k`
    nearest colours in `colours` (`normal_colours`). A map of where an image is anomalous that needs no normal image
    under it."""
    distances, _ = colours.query(_smoothed_colours(image), k=k)
    return distances.mean(1).reshape(image.shape[:2])


def mask_agreement(images, masks, normals) -> float:
    """Whether each image's anomaly lies where its mask says: the pixel AUROC of `outlier_map` against the mask,
    averaged over the images (0.5: no relation; an empty or full mask counts 0.5)."""
    from sklearn.metrics import roc_auc_score

    colours = normal_colours(normals)
    scores = []
    for image, mask in zip(images, masks):
        scores.append(roc_auc_score(mask.ravel(), outlier_map(image, colours).ravel()) if 0 < mask.mean() < 1 else 0.5)
    return float(np.mean(scores))


def variant_measures(task, runs, classifier, cell: int) -> dict[str, float]:
    """The claim tests' measures of one variant over `runs`, [(samples, request, label)]: the lowest background and
    the mean contrast and defect over the runs (`measure`; each run's request names the defect type its colour move
    is measured towards), the share of samples `classifier` calls their run's label (`type`), and how well the
    defects fill their masks (`fills mask`: `mask_agreement` over every sample)."""
    measured = [measure(task, samples, request, cell=cell) for samples, request, _ in runs]
    samples = [(s, t) for run_samples, request, _ in runs for s, t in zip(run_samples, request.targets)]
    images, masks = [s.image for s, _ in samples], [t.mask for _, t in samples]
    labels = [label for run_samples, _, label in runs for _ in run_samples]
    picks = classifier.predict(images, masks)
    return {"background": min(m["background"] for m in measured),
            "contrast": float(np.mean([m["contrast"] for m in measured])),
            "defect": float(np.mean([m["defect"] for m in measured])),
            "type": float(np.mean([p == label for p, label in zip(picks, labels)])),
            "fills mask": mask_agreement(images, masks, np.stack([t.normal.image for _, t in samples]))}


def blend_margin(method) -> int:
    """Pixels to grow a mask by before measuring the background: the re-weighting's blend radius at the last step
    (latent cells of the shipped backbone's 4x autoencoder) and one cell more, the decoder's reach."""
    from harness.methods import get_method_info

    package = sys.modules[get_method_info("anomalydiffusion").cls.__module__].__package__
    adaptive = importlib.import_module(package + ".adaptive")  # AnomalyXFusion's sampler is AnomalyDiffusion's
    return 4 * (1 + adaptive.radius(1, method.config["inference_steps"]))


def assert_holds(claims: dict, measured: dict) -> None:
    """Every claim holds for the working method's measures (the message gives each claim's verdict)."""
    verdicts = {name: bool(claim(measured)) for name, claim in claims.items()}
    assert all(verdicts.values()), (verdicts, measured)


def assert_fails(claims: dict, measured: dict, label: str, which: list[str] | None = None) -> None:
    """A negative control fails each claim in `which` (the claims resting on what it breaks), or at least one claim:
    a claim test that a broken method also passes tests nothing."""
    if which is None:
        assert not all(claim(measured) for claim in claims.values()), f"{label} holds every claim: {measured}"
    else:
        passed = [name for name in which if claims[name](measured)]
        assert not passed, f"{label} passes {passed}: {measured}"


def claim_tests(claims: dict, fixture: str, controls: list[tuple[str, list[str] | None]]):
    """A method's two claim tests (make test-slow), over the measures its `fixture` returns per variant: the working
    method holds every claim, and each control, named with the claims it must fail (None: at least one), fails them.

        test_the_working_method_holds_every_claim, test_each_control_fails_its_claims = claim_tests(
            CLAIMS, "claim_variants", [("e_a zeroed", ["the defect is its type's (e_a)"]), ("no blend", None)])
    """
    import pytest

    from tests.benchmarks import record

    @pytest.mark.slow
    def test_the_working_method_holds_every_claim(request):
        """(Writes every variant's measures to results/bench/claims-<method>.json first: the README's table.)"""
        variants = request.getfixturevalue(fixture)
        missing = [name for name in ["working", *(broken for broken, _ in controls)] if name not in variants]
        assert not missing, f"the fixture {fixture!r} has no variant {missing}"
        test = request.path.resolve().relative_to(record.REPO / "methods")  # <method>/tests/test_<method>.py
        record.write_claims(test.parts[0], f"methods/{test}", claims, dict(controls), variants)
        assert_holds(claims, variants["working"])

    @pytest.mark.slow
    @pytest.mark.parametrize("broken, which", controls, ids=[broken for broken, _ in controls])
    def test_each_control_fails_its_claims(request, broken, which):
        assert_fails(claims, request.getfixturevalue(fixture)[broken], broken, which)

    return test_the_working_method_holds_every_claim, test_each_control_fails_its_claims
