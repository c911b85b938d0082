"""U2-Net (Qin, Zhang, Huang, Dehghan, Zaiane, Jagersand, "U2-Net: Going deeper with nested U-structure for salient
object detection", Pattern Recognition 2020) and the authors' test-time pipeline, which DualAnoDiff uses to segment
its generated anomaly parts.

Written from facts read in xuebinqin/U-2-Net (commit ac7e1c8, 2024-01-12); none of its code is copied.

The network (`model/u2net.py`, class `U2NET`). The module and layer names below are those of the released
checkpoint `u2net.pth` (173.6 MB), so `U2Net().load_state_dict(torch.load("u2net.pth"))` works with strict=True:
44,009,869 parameters, 798 state-dict entries.

- Every convolution is a 3x3 conv (with bias, padding = dilation) -> BatchNorm -> ReLU, named `conv_s1`, `bn_s1`.
- A residual U-block of depth L (RSU-7/6/5/4) has `rebnconvin` (in -> out), an encoder `rebnconv1` .. `rebnconvL`
  (out -> mid, then mid -> mid; 2x2 max-pooling with ceil_mode after levels 1 .. L-2; level L dilated by 2) and a
  decoder `rebnconv{L-1}d` .. `rebnconv1d` (2 mid -> mid, the last 2 mid -> out), each fed the concatenation
  (deeper features upsampled to the skip's size, skip). It returns decoder output + `rebnconvin`'s output.
  RSU-4F has no pooling: dilations 1, 2, 4, 8 down and 4, 2, 1 up.
- `stage1`..`stage6` (RSU-7, 6, 5, 4, 4F, 4F; mid/out 32/64, 32/128, 64/256, 128/512, 256/512, 256/512) with
  max-pooling between stages; decoder `stage5d`..`stage1d` (RSU-4F, 4, 5, 6, 7; mid/out 256/512, 128/256, 64/128,
  32/64, 16/64), each fed (deeper decoder output upsampled, encoder skip). `side1`..`side5` are 3x3 convs on the
  decoder outputs, `side6` on `stage6`; all are upsampled to `side1`'s (the input's) size and fused by the 1x1
  `outconv`. Upsampling is bilinear to the target's exact size (`F.upsample`, i.e. align_corners=False), so any
  input size works.
- `forward` returns sigmoid(fused), sigmoid(side1), ..., sigmoid(side6), in that order.

The test pipeline (`u2net_test.py`, `data_loader.py`), as `saliency` reproduces it, odd parts included:

1. `data_loader.RescaleT(320)`: `skimage.transform.resize(image, (320, 320), mode='constant')`. The aspect ratio is
   computed and then unused: every image becomes 320 x 320. With its defaults the uint8 image becomes float in
   [0, 1] (/255), is smoothed by a Gaussian of sigma (factor - 1) / 2 per downscaled axis (anti-aliasing on by
   default when shrinking), then bilinearly resampled (order 1) with zeros outside the image, so upscaling darkens
   the border pixels. Reproduced with SciPy exactly as scikit-image >= 0.19 does it (`_resize_320`); older
   scikit-image versions differ at the borders and in the anti-aliasing default.
2. `data_loader.ToTensorLab(flag=0)`: the resized image is divided by its own maximum (over all channels), so
   brightness is stretched per image and 255 is not the scale; then channel c -> (x - mean_c) / std_c with
   mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), in RGB order. An all-black image divides 0 by 0 there;
   here it is left at 0.
3. `u2net_test.main`: the first returned map, which the script calls `d1` but is the *fused* output, is min-max
   normalised per image (`normPRED`, batch size 1). A constant map divides 0 by 0 there; here it becomes 0.
4. `u2net_test.save_output`: the map times 255 becomes a float PIL image converted to RGB (which truncates to
   uint8), resized to the image's size with PIL's bilinear filter and saved as PNG. Reproduced with PIL here
   (converting to 'L', which gives the same bytes as each of the RGB copies), so the maps are multiples of 1/255.

DualAnoDiff's mask loader (`eval/unet_utils/data_loader.py` in the authors' code) reads the PNG as 'L', scales it to
[0, 1] and keeps pixels strictly above 0.5: `part_mask`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

INPUT_SIZE = 320
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (name, depth, dilated, mid, out) at width 1; a stage's input is the previous stage's output.
_ENCODER = (
    ("stage1", 7, False, 32, 64),
    ("stage2", 6, False, 32, 128),
    ("stage3", 5, False, 64, 256),
    ("stage4", 4, False, 128, 512),
    ("stage5", 4, True, 256, 512),
    ("stage6", 4, True, 256, 512),
)
# Decoder stage k (5 .. 1) takes (its deeper neighbour's output, encoder stage k's output).
_DECODER = (
    ("stage5d", 4, True, 256, 512),
    ("stage4d", 4, False, 128, 256),
    ("stage3d", 5, False, 64, 128),
    ("stage2d", 6, False, 32, 64),
    ("stage1d", 7, False, 16, 64),
)


def _upsample_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of `x` to `target`'s spatial size; a no-op when they already agree."""
    if x.shape[2:] == target.shape[2:]:
        return x
    return F.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class ConvBnRelu(nn.Module):
    """3x3 convolution (padding = dilation, keeps the size), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class ResidualUBlock(nn.Module):
    """RSU-`depth` (a small U-Net plus a residual connection); `dilated` gives RSU-4F, which replaces pooling by
    growing dilation."""

    def __init__(self, depth: int, in_channels: int, mid_channels: int, out_channels: int, dilated: bool = False):
        super().__init__()
        self.depth = depth
        self.dilated = dilated
        self.rebnconvin = ConvBnRelu(in_channels, out_channels)
        for level in range(1, depth + 1):
            source = out_channels if level == 1 else mid_channels
            self.add_module(f"rebnconv{level}", ConvBnRelu(source, mid_channels, self._dilation(level)))
        for level in range(depth - 1, 0, -1):
            target = out_channels if level == 1 else mid_channels
            self.add_module(f"rebnconv{level}d", ConvBnRelu(2 * mid_channels, target, self._dilation(level)))

    def _dilation(self, level: int) -> int:
        if self.dilated:
            return 2 ** (level - 1)
        return 2 if level == self.depth else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.rebnconvin(x)
        skips = []
        h = entry
        for level in range(1, self.depth):
            if level > 1 and not self.dilated:
                h = _pool(h)
            h = getattr(self, f"rebnconv{level}")(h)
            skips.append(h)
        h = getattr(self, f"rebnconv{self.depth}")(h)  # the bottom: no pooling before it
        for level in range(self.depth - 1, 0, -1):
            skip = skips.pop()
            h = getattr(self, f"rebnconv{level}d")(torch.cat((_upsample_like(h, skip), skip), dim=1))
        return h + entry


class U2Net(nn.Module):
    """U2-Net with the checkpoint's layer names. `width` scales every internal channel count (1.0: the released
    model); the names stay, only shapes change."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, width: float = 1.0):
        super().__init__()

        def scaled(channels: int) -> int:
            return max(1, round(channels * width))

        encoder_out = []
        source = in_channels
        for name, depth, dilated, mid, out in _ENCODER:
            self.add_module(name, ResidualUBlock(depth, source, scaled(mid), scaled(out), dilated))
            source = scaled(out)
            encoder_out.append(source)
        # Inputs computed from the scaled outputs, so that concatenations agree at any width.
        deeper = encoder_out[-1]
        side_in = []
        for (name, depth, dilated, mid, out), skip in zip(_DECODER, reversed(encoder_out[:-1])):
            self.add_module(name, ResidualUBlock(depth, deeper + skip, scaled(mid), scaled(out), dilated))
            deeper = scaled(out)
            side_in.append(deeper)
        side_in = side_in[::-1] + [encoder_out[-1]]  # side1 .. side5 on stage1d .. stage5d, side6 on stage6
        for index, channels in enumerate(side_in, start=1):
            self.add_module(f"side{index}", nn.Conv2d(channels, out_channels, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, C, H, W) -> (fused, side1, ..., side6), each (N, out_channels, H, W) after a sigmoid. The fused map
        comes first, as in the official model (its test script calls it `d1`)."""
        encoded = []
        h = x
        for index, (name, *_) in enumerate(_ENCODER):
            if index > 0:
                h = _pool(h)
            h = getattr(self, name)(h)
            encoded.append(h)
        decoded = []
        for (name, *_), skip in zip(_DECODER, reversed(encoded[:-1])):
            h = getattr(self, name)(torch.cat((_upsample_like(h, skip), skip), dim=1))
            decoded.append(h)
        side_features = decoded[::-1] + [encoded[-1]]
        first = self.side1(side_features[0])
        sides = [first] + [
            _upsample_like(getattr(self, f"side{index}")(features), first)
            for index, features in enumerate(side_features[1:], start=2)
        ]
        fused = self.outconv(torch.cat(sides, dim=1))
        return tuple(torch.sigmoid(d) for d in [fused] + sides)


def _resize_320(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float64 (320, 320, 3) in [0, 1]: `skimage.transform.resize(image, (320, 320),
    mode='constant')` (scikit-image >= 0.19, SciPy >= 1.6), step 1 of the module docstring."""
    height, width = image.shape[:2]
    values = image.astype(np.float64) / 255.0
    factors = np.array([height / INPUT_SIZE, width / INPUT_SIZE, 1.0])
    if np.any(factors > 1):
        values = ndimage.gaussian_filter(values, np.maximum(0.0, (factors - 1) / 2), mode="constant", cval=0.0)
    return ndimage.zoom(values, 1 / factors, order=1, mode="grid-constant", cval=0.0, grid_mode=True)


def preprocess(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, 320, 320): the network's input, steps 1-2 of the module docstring."""
    resized = _resize_320(image)
    peak = resized.max()
    if peak > 0:
        resized = resized / peak
    normalised = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map (d - min) / (max - min) over the last two axes; a constant map becomes 0."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0)


def _to_image_size(saliency_320: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (320, 320) in [0, 1] -> float32 (height, width): the saved PNG (uint8, PIL bilinear) read back / 255,
    step 4 of the module docstring."""
    grey = Image.fromarray(saliency_320.astype(np.float32) * 255).convert("L")  # truncates, as the script's 'RGB'
    return np.asarray(grey.resize((width, height), resample=Image.Resampling.BILINEAR), dtype=np.float32) / 255


def saliency(model: U2Net, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, H, W) in [0, 1]: the official test script's saved masks, read back.

    Runs in eval mode (restoring the model's mode after) under no_grad on the model's device. Each map is min-max
    normalised at 320 px, so it spans 0 .. 1 there; the bilinear resize back may miss the extremes slightly.
    With batch_size=1 this equals the script's PNGs bit for bit on a CPU; larger batches may change the float
    rounding of the convolutions, which the uint8 truncation turns into 1/255 at a few pixels.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    device = next(model.parameters()).device
    height, width = images.shape[1:3]
    result = np.zeros(images.shape[:3], dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = np.stack([preprocess(image) for image in images[start:start + batch_size]])
                fused = model(torch.from_numpy(batch).to(device))[0][:, 0]
                for offset, normalised in enumerate(_min_max(fused).cpu().numpy()):
                    result[start + offset] = _to_image_size(normalised, height, width)
    finally:
        model.train(was_training)
    return result


def part_mask(saliency_map: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The part's mask: saliency strictly above `threshold`, as DualAnoDiff's loader does (module docstring)."""
    return np.asarray(saliency_map) > threshold
