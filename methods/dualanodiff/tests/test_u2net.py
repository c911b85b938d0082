"""U2-Net (methods/dualanodiff/u2net.py): the released checkpoint's names, shapes and parameter count, a tiny-width
forward, the official test script's preprocessing against a direct computation, saliency maps, the part mask and a
strict state-dict round trip."""
from __future__ import annotations

import hashlib
import io
import sys

import numpy as np
import pytest
import torch

from harness.methods import get_method_info

# Computed from xuebinqin/U-2-Net's model/u2net.py (U2NET(3, 1), commit ac7e1c8): the number of parameters, and the
# sha256 of its state dict listed as "name (shape)" lines, sorted by name, joined by newlines.
OFFICIAL_PARAMETERS = 44_009_869
OFFICIAL_ENTRIES = 798
OFFICIAL_LISTING_SHA256 = "bc4da5825d16dca6d2f5e1918decccd1dd746582b1610ef654da4b4638a5cff7"

# (stage, RSU depth) of the official model, encoder then decoder.
STAGES = (("stage1", 7), ("stage2", 6), ("stage3", 5), ("stage4", 4), ("stage5", 4), ("stage6", 4),
          ("stage5d", 4), ("stage4d", 4), ("stage3d", 5), ("stage2d", 6), ("stage1d", 7))
LAYER_ENTRIES = ("conv_s1.weight", "conv_s1.bias", "bn_s1.weight", "bn_s1.bias", "bn_s1.running_mean",
                 "bn_s1.running_var", "bn_s1.num_batches_tracked")
TINY = 0.125


@pytest.fixture(scope="module")
def u2net():
    """The module (importable once discovery has loaded the method's package)."""
    import importlib

    package = sys.modules[get_method_info("dualanodiff").cls.__module__].__package__
    return importlib.import_module(package + ".u2net")


def _expected_names() -> set[str]:
    names = set()
    for stage, depth in STAGES:
        layers = ["rebnconvin"] + [f"rebnconv{level}" for level in range(1, depth + 1)]
        layers += [f"rebnconv{level}d" for level in range(depth - 1, 0, -1)]
        names |= {f"{stage}.{layer}.{entry}" for layer in layers for entry in LAYER_ENTRIES}
    for conv in [f"side{index}" for index in range(1, 7)] + ["outconv"]:
        names |= {f"{conv}.weight", f"{conv}.bias"}
    return names


def _listing_sha256(state: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{name} {tuple(value.shape)}" for name, value in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _tiny(u2net, seed: int = 0):
    """A tiny-width model in eval mode with random BatchNorm statistics, so they matter."""
    torch.manual_seed(seed)
    model = u2net.U2Net(width=TINY)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_full_model_matches_the_released_checkpoint(u2net):
    with torch.device("meta"):
        model = u2net.U2Net()
    state = model.state_dict()
    assert set(state) == _expected_names()
    assert len(state) == OFFICIAL_ENTRIES
    assert _listing_sha256(state) == OFFICIAL_LISTING_SHA256
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS
    shapes = {
        "stage1.rebnconvin.conv_s1.weight": (64, 3, 3, 3),
        "stage1.rebnconv1.conv_s1.weight": (32, 64, 3, 3),
        "stage1.rebnconv7.conv_s1.weight": (32, 32, 3, 3),
        "stage1.rebnconv1d.conv_s1.weight": (64, 64, 3, 3),
        "stage5.rebnconv4.bn_s1.running_var": (256,),
        "stage5d.rebnconvin.conv_s1.weight": (512, 1024, 3, 3),
        "stage1d.rebnconvin.conv_s1.weight": (64, 128, 3, 3),
        "stage1d.rebnconv2d.conv_s1.weight": (16, 32, 3, 3),
        "side3.weight": (1, 128, 3, 3),
        "side6.weight": (1, 512, 3, 3),
        "outconv.weight": (1, 6, 1, 1),
        "stage6.rebnconv4.bn_s1.num_batches_tracked": (),
    }
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name


def test_rsu4f_dilations_and_rsu_bottom(u2net):
    with torch.device("meta"):
        model = u2net.U2Net()
    dilated = {name: model.stage5.get_submodule(name).conv_s1.dilation[0]
               for name in ("rebnconvin", "rebnconv1", "rebnconv2", "rebnconv3", "rebnconv4",
                            "rebnconv3d", "rebnconv2d", "rebnconv1d")}
    assert dilated == {"rebnconvin": 1, "rebnconv1": 1, "rebnconv2": 2, "rebnconv3": 4, "rebnconv4": 8,
                       "rebnconv3d": 4, "rebnconv2d": 2, "rebnconv1d": 1}
    assert model.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    assert model.stage1.rebnconv6.conv_s1.dilation == (1, 1)


def test_width_keeps_the_names(u2net):
    with torch.device("meta"):
        full = u2net.U2Net().state_dict()
        tiny = u2net.U2Net(width=TINY).state_dict()
    assert set(tiny) == set(full)
    assert tuple(tiny["stage5d.rebnconvin.conv_s1.weight"].shape) == (64, 128, 3, 3)
    assert tuple(tiny["stage1.rebnconvin.conv_s1.weight"].shape) == (8, 3, 3, 3)


def test_tiny_forward_on_an_odd_size(u2net):
    model = _tiny(u2net)
    x = torch.randn(2, 3, 72, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(x)
        assert len(outputs) == 7
        for output in outputs:
            assert output.shape == (2, 1, 72, 100)
            assert 0 <= output.min() and output.max() <= 1
        # The first output is the fused one: outconv over the six side outputs' logits.
        fused = torch.sigmoid(model.outconv(torch.logit(torch.cat(outputs[1:], dim=1).double()).float()))
    torch.testing.assert_close(outputs[0], fused, atol=1e-5, rtol=0)


def _reference_linear(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear resampling of one axis onto `size` pixel centres, zeros outside the image."""
    n = values.shape[axis]
    centres = (np.arange(size) + 0.5) * n / size - 0.5
    low = np.floor(centres).astype(int)
    frac = centres - low
    padding = [(1, 1) if a == axis else (0, 0) for a in range(values.ndim)]
    padded = np.pad(values, padding)
    shape = [1] * values.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return np.take(padded, low + 1, axis=axis) * (1 - frac) + np.take(padded, low + 2, axis=axis) * frac


def _reference_gaussian(values: np.ndarray, axis: int, sigma: float) -> np.ndarray:
    """Gaussian smoothing of one axis, zeros outside, kernel radius int(4 sigma + 0.5) (SciPy's truncation)."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * offsets ** 2 / sigma ** 2)
    kernel /= kernel.sum()
    padding = [(radius, radius) if a == axis else (0, 0) for a in range(values.ndim)]
    padded = np.pad(values, padding)
    n = values.shape[axis]
    return sum(w * np.take(padded, np.arange(n) + radius + o, axis=axis) for w, o in zip(kernel, offsets))


def _reference_preprocess(image: np.ndarray) -> np.ndarray:
    """RescaleT(320) then ToTensorLab(flag=0), written out directly."""
    values = image / 255.0
    for axis in (0, 1):
        factor = image.shape[axis] / 320
        if factor > 1:
            values = _reference_gaussian(values, axis, (factor - 1) / 2)
    for axis in (0, 1):
        values = _reference_linear(values, axis, 320)
    values = values / values.max()
    values = (values - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return values.transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(5, 7), (6, 400), (330, 1000)])
def test_preprocessing_matches_a_direct_computation(u2net, shape):
    image = np.random.default_rng(2).integers(0, 200, shape + (3,), dtype=np.uint8)
    result = u2net.preprocess(image)
    assert result.shape == (3, 320, 320) and result.dtype == np.float32
    np.testing.assert_allclose(result, _reference_preprocess(image), atol=1e-5, rtol=0)


def test_preprocessing_matches_scikit_image(u2net):
    transform = pytest.importorskip("skimage.transform")
    image = np.random.default_rng(3).integers(0, 256, (90, 500, 3), dtype=np.uint8)
    resized = transform.resize(image, (320, 320), mode="constant")
    resized = resized / resized.max()
    expected = ((resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1)
    np.testing.assert_allclose(u2net.preprocess(image), expected, atol=1e-6, rtol=0)


def test_saliency_maps(u2net):
    model = _tiny(u2net).train()
    rng = np.random.default_rng(4)
    square = rng.integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    maps = u2net.saliency(model, square, batch_size=2)
    assert model.training  # the caller's mode is restored
    assert maps.shape == (3, 320, 320) and maps.dtype == np.float32
    for saliency_map in maps:  # at 320 px the resize is the identity: the min-max normalisation shows
        assert saliency_map.min() == 0 and saliency_map.max() == 1
    np.testing.assert_array_equal(maps * 255, np.round(maps * 255))  # the saved PNG's levels
    odd = rng.integers(0, 256, (2, 72, 100, 3), dtype=np.uint8)
    maps = u2net.saliency(model, odd, batch_size=2)
    assert maps.shape == (2, 72, 100)
    assert 0 <= maps.min() and maps.max() <= 1
    assert (maps.max(axis=(1, 2)) > maps.min(axis=(1, 2))).all()


def test_saliency_is_batch_independent(u2net):
    model = _tiny(u2net)
    images = np.random.default_rng(5).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    together = u2net.saliency(model, images, batch_size=2)
    alone = np.stack([u2net.saliency(model, image[None], batch_size=1)[0] for image in images])
    np.testing.assert_allclose(together, alone, atol=1 / 255 + 1e-6)  # uint8 truncation may flip a level


def test_part_mask(u2net):
    values = np.array([[0.0, 127 / 255, 0.5], [128 / 255, 0.9, 1.0]], dtype=np.float32)
    expected = np.array([[False, False, False], [True, True, True]])
    np.testing.assert_array_equal(u2net.part_mask(values), expected)
    assert u2net.part_mask(values, threshold=0.95).sum() == 1


def test_state_dict_loads_strictly(u2net):
    source, target = _tiny(u2net, seed=0), _tiny(u2net, seed=1)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(RuntimeError):
        u2net.U2Net(width=0.25).load_state_dict(source.state_dict())
