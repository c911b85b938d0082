"""StyleGAN2 (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020) in the configuration
DFMGAN's stage 1 trains (StyleGAN2-ADA's `auto`: skip generator, resnet discriminator), and DFMGAN's defect-aware
additions (stage 2): a defect mapping network, residual blocks modulated by w_d, a mask at the first of them and the
hard gate. Written from the papers; sizes are GanShape's. Every weight has an equalised learning rate: it is stored
N(0, 1) and scaled by 1/sqrt(fan-in) when used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)
CLAMP = 256.0  # conv_clamp: activations are clamped to +-256 (StyleGAN2-ADA's fp16 guard, kept in fp32 too)


@dataclass(frozen=True)
class GanShape:
    resolution: int  # of the images (a power of two >= 8)
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 2  # StyleGAN2-ADA's `auto` (StyleGAN2's paper: 8)
    channel_base: int = 16384  # a block at resolution r has min(channel_base / r, channel_max) channels
    channel_max: int = 512
    mbstd_group: int = 4
    defect_from: int = 64  # DFMGAN: residual blocks at this resolution and above, the mask at this one

    @property
    def resolutions(self) -> list[int]:
        return [2 ** k for k in range(2, int(math.log2(self.resolution)) + 1)]

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)

    @property
    def num_ws(self) -> int:  # one w per convolution, plus the last ToRGB's
        return 1 + 2 * (len(self.resolutions) - 1) + 1

    @property
    def defect_resolutions(self) -> list[int]:
        return [r for r in self.resolutions if r >= self.defect_from]

    @property
    def num_defect_ws(self) -> int:  # two per residual block, plus the mask's
        return 2 * len(self.defect_resolutions) + 1


# ---- FIR resampling (the [1, 3, 3, 1] filter) -------------------------------------------------------------


def fir_kernel(taps=(1.0, 3.0, 3.0, 1.0)) -> torch.Tensor:
    k = torch.tensor(taps)
    k = torch.outer(k, k)
    return k / k.sum()


def blur(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """The 2-D FIR filter on every channel, the input padded by pad[0] before and pad[1] after on both axes."""
    c = x.shape[1]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    return F.conv2d(x, kernel.to(x)[None, None].expand(c, 1, *kernel.shape), groups=c)


def upsample2(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x2: zeros inserted, then the filter with gain 4 (upfirdn2d's up=2, padding (2, 1) for 4 taps)."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return blur(up, kernel * 4, (2, 1))


def downsample2(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """/2: the filter, then every other pixel (upfirdn2d's down=2, padding (1, 1))."""
    return blur(x, kernel, (1, 1))[:, :, ::2, ::2]


# ---- layers with an equalised learning rate -----------------------------------------------------------------


class FullyConnected(nn.Module):
    def __init__(self, cin: int, cout: int, activation: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), float(bias_init)))
        self.weight_gain, self.bias_gain, self.activation = lr_mul / math.sqrt(cin), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) * SQRT2 if self.activation else x


class Conv(nn.Module):
    """A discriminator convolution; down: the FIR filter, then a stride-2 convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, activation: bool = True, down: bool = False,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = 1 / math.sqrt(cin * kernel * kernel)
        self.activation, self.down, self.kernel = activation, down, kernel
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down and self.kernel == 1:
            x = F.conv2d(downsample2(x, self.fir), w)
        elif self.down:  # 4-tap filter padded by 2: H + 1 rows; a 3x3 stride-2 convolution gives H / 2
            x = F.conv2d(blur(x, self.fir, (2, 2)), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        if self.activation:
            x = F.leaky_relu(x, 0.2) * SQRT2
        return (x * gain).clamp(-CLAMP, CLAMP)


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """StyleGAN2's Eq. 1-3: w'_ijk = s_i w_ijk, then w''_ijk = w'_ijk / sqrt(sum_ik w'^2 + 1e-8) when demodulating.
    Computed as StyleGAN2-ADA does in training (fused_modconv off): the input scaled by s, one convolution shared by
    the batch, the output scaled by the demodulation coefficients (the same numbers; a grouped convolution with
    per-sample weights is 3x slower on a CPU)."""
    k = weight.shape[-1]
    out = F.conv2d(x * styles[:, :, None, None], weight, padding=k // 2)
    if demodulate:
        coefficients = ((weight[None] * styles[:, None, :, None, None]).square().sum(dim=(2, 3, 4)) + 1e-8).rsqrt()
        out = out * coefficients[:, :, None, None]
    return out


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (up: FIR x2 first), per-pixel noise with a learnt strength (0 at first), bias,
    leaky ReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.affine = FullyConnected(w_dim, cin, activation=False, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("fir", fir_kernel(), persistent=False)
        self.up, self.resolution = up, resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: str = "random") -> torch.Tensor:
        if self.up:
            x = upsample2(x, self.fir)
        x = modulated_conv(x, self.weight, self.affine(w), demodulate=True)
        if noise == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device) * self.noise_strength
        elif noise == "const":
            x = x + self.noise_const * self.noise_strength
        return (F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * SQRT2).clamp(-CLAMP, CLAMP)


class ToImage(nn.Module):
    """ToRGB (or DFMGAN's ToMask, one channel): a modulated 1x1 convolution without demodulation, its styles scaled
    by 1/sqrt(C_in), plus a bias."""

    def __init__(self, cin: int, cout: int, w_dim: int):
        super().__init__()
        self.affine = FullyConnected(w_dim, cin, activation=False, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.gain = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = modulated_conv(x, self.weight, self.affine(w) * self.gain, demodulate=False)
        return (x + self.bias[None, :, None, None]).clamp(-CLAMP, CLAMP)


class Mapping(nn.Module):
    """z -> w: z normalised by its second moment, then `layers` fully connected layers at lr x 0.01; w broadcast to
    every layer. w_avg (the moving mean, beta 0.995) is tracked for truncation."""

    def __init__(self, shape: GanShape, num_ws: int):
        super().__init__()
        dims = [shape.z_dim] + [shape.w_dim] * shape.mapping_layers
        self.layers = nn.Sequential(*[FullyConnected(a, b, lr_mul=0.01) for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("w_avg", torch.zeros(shape.w_dim))
        self.num_ws = num_ws

    def forward(self, z: torch.Tensor, psi: float = 1.0, track: bool = False) -> torch.Tensor:
        z = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        w = self.layers(z)
        if track:
            self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, 0.995))
        if psi != 1.0:
            w = self.w_avg.lerp(w, psi)
        return w[:, None].repeat(1, self.num_ws, 1)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const | up-conv), conv; the image path is upsampled and ToRGB added."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int):
        super().__init__()
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(cin, cout, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(cout, cout, w_dim, resolution)
        self.torgb = ToImage(cout, 3, w_dim)
        self.num_conv = 1 if cin == 0 else 2
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def features(self, x: torch.Tensor | None, ws: torch.Tensor, noise: str) -> torch.Tensor:
        if self.num_conv == 1:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x, ws[:, 0], noise)
        return self.conv1(x, ws[:, self.num_conv - 1], noise)

    def image(self, x: torch.Tensor, img: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        y = self.torgb(x, w)
        return y if img is None else upsample2(img, self.fir) + y


class DefectBlock(nn.Module):
    """DFMGAN's residual block R_r: up-conv and conv modulated by w_d, reading the main features X_{r/2}; the first
    one (r = defect_from) also has ToMask, the mask logits M_r."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, with_mask: bool):
        super().__init__()
        self.conv0 = SynthesisLayer(cin, cout, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(cout, cout, w_dim, resolution)
        self.tomask = ToImage(cout, 1, w_dim) if with_mask else None

    def forward(self, x: torch.Tensor, ws: torch.Tensor, noise: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.conv1(self.conv0(x, ws[:, 0], noise), ws[:, 1], noise)
        return f, (self.tomask(f, ws[:, 2]) if self.tomask is not None else None)


class Generator(nn.Module):
    """The skip generator; with `defect`, DFMGAN's additions: F_r gated by 1[M_r >= 0] is added to the main block's
    features before its ToRGB (and passed on), M_r upsampled with the FIR filter above defect_from."""

    def __init__(self, shape: GanShape, defect: bool = False):
        super().__init__()
        self.shape = shape
        c = shape.channels
        self.mapping = Mapping(shape, shape.num_ws)
        self.blocks = nn.ModuleDict({str(r): SynthesisBlock(0 if r == 4 else c(r // 2), c(r), shape.w_dim, r)
                                     for r in shape.resolutions})
        self.defect = defect
        if defect:
            if shape.defect_from not in shape.resolutions[1:]:
                raise ValueError(f"dfmgan: defect_from {shape.defect_from} is not one of {shape.resolutions[1:]}")
            self.defect_mapping = Mapping(shape, shape.num_defect_ws)
            self.defect_blocks = nn.ModuleDict({str(r): DefectBlock(c(r // 2), c(r), shape.w_dim, r,
                                                                    with_mask=r == shape.defect_from)
                                                for r in shape.defect_resolutions})
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def synthesis(self, ws: torch.Tensor, defect_ws: torch.Tensor | None = None, noise: str = "random",
                  gate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ws (B, num_ws, w_dim) [and defect_ws (B, num_defect_ws, w_dim)] -> image (B, 3, R, R) and the mask logits
        M_R (B, 1, R, R), or None without defect_ws. gate=False adds F_r everywhere (a claim test's control)."""
        x = img = mask = None
        w_index = d_index = 0
        for r, block in self.blocks.items():
            block_ws = ws[:, w_index:w_index + block.num_conv + 1]
            w_index += block.num_conv
            x_in, x = x, block.features(x, block_ws, noise)
            if defect_ws is not None and r in getattr(self, "defect_blocks", {}):
                f, m = self.defect_blocks[r](x_in, defect_ws[:, d_index:d_index + 3], noise)
                d_index += 2
                mask = m if m is not None else upsample2(mask, self.fir)
                x = x + (f * (mask >= 0).to(f) if gate else f)
            img = block.image(x, img, block_ws[:, -1])
        return img, mask

    def mask(self, ws: torch.Tensor, defect_ws: torch.Tensor, noise: str = "random") -> torch.Tensor:
        """M_R alone, as `synthesis` computes it: the main features up to defect_from / 2, the first residual block
        and its ToMask, upsampled (what L_ms reads; the blocks above defect_from are not run)."""
        x, w_index = None, 0
        for r, block in self.blocks.items():
            if int(r) == self.shape.defect_from:
                _, mask = self.defect_blocks[r](x, defect_ws[:, :3], noise)
                while mask.shape[-1] < self.shape.resolution:
                    mask = upsample2(mask, self.fir)
                return mask
            x = block.features(x, ws[:, w_index:w_index + block.num_conv + 1], noise)
            w_index += block.num_conv
        raise ValueError("dfmgan: a generator without defect blocks has no mask")

    def forward(self, z: torch.Tensor, z_defect: torch.Tensor | None = None, noise: str = "random",
                psi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        ws = self.mapping(z, psi)
        defect_ws = self.defect_mapping(z_defect) if z_defect is not None else None
        return self.synthesis(ws, defect_ws, noise)

    def defect_parameters(self) -> list[nn.Parameter]:
        """What stage 2 trains: f_d and the residual blocks (the stage-1 mapping and synthesis stay frozen)."""
        return [*self.defect_mapping.parameters(), *self.defect_blocks.parameters()]


class DiscriminatorBlock(nn.Module):
    """resnet: conv, down-conv, and a 1x1 down skip without bias; both branches x sqrt(0.5). FromRGB at the top."""

    def __init__(self, cin: int, cout: int, image_channels: int, top: bool):
        super().__init__()
        self.fromrgb = Conv(image_channels, cin, 1) if top else None
        self.conv0 = Conv(cin, cin, 3)
        self.conv1 = Conv(cin, cout, 3, down=True)
        self.skip = Conv(cin, cout, 1, activation=False, down=True, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        return self.skip(x, gain=math.sqrt(0.5)) + self.conv1(self.conv0(x), gain=math.sqrt(0.5))


class Discriminator(nn.Module):
    """StyleGAN2's resnet discriminator; epilogue at 4x4: minibatch standard deviation (groups of 4, one feature),
    conv, fully connected, the logit. DFMGAN's D_match is one with 4 input channels (image and mask)."""

    def __init__(self, shape: GanShape, image_channels: int = 3):
        super().__init__()
        self.shape, c = shape, shape.channels
        tops = [r for r in reversed(shape.resolutions) if r > 4]
        self.blocks = nn.Sequential(*[DiscriminatorBlock(c(r), c(r // 2), image_channels, top=(r == tops[0]))
                                      for r in tops])
        self.conv = Conv(c(4) + 1, c(4), 3)
        self.fc = FullyConnected(c(4) * 16, c(4))
        self.out = FullyConnected(c(4), 1, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = torch.cat([x, minibatch_std(x, self.shape.mbstd_group)], dim=1)
        return self.out(self.fc(self.conv(x).flatten(1)))[:, 0]


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """The standard deviation of each feature over groups of `group` samples, averaged: one extra feature map."""
    b, c, h, w = x.shape
    g = min(group, b)
    if b % g:
        raise ValueError(f"dfmgan: the batch ({b}) is not a multiple of the minibatch-std group ({g})")
    y = x.reshape(g, -1, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    return y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
