"""The paper's classifiers: FCN, CNN, ST-FCN, ST-CNN (one or several parallel transformers), and the
co-localization model (attention transformer with a soft-argmax localizer + a fixed pre-trained encoder).

Layer sizes follow our reading of the paper's appendix (all are constructor arguments, so configs
can change them): FCN with two hidden ReLU layers; CNN with two conv + 2x2 max-pool blocks (9x9 and
7x7 kernels) and a linear classifier (``cnn_hidden`` adds fully connected layers before it);
localization networks an FCN of three 32-unit layers (ST-FCN) or a two-block 5x5 CNN with 20
filters and a 50-unit layer (ST-CNN); the regression head starts at the identity transform.
Inputs are ``(N, C, H, W)`` floats scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.stn import MultiSpatialTransformer, SpatialTransformer
from ..sampler import sample
from ..transforms import Affine, Attention, Projective, ThinPlateSpline, uniform_control_points

__all__ = [
    "ARCHITECTURES",
    "CoLocalizer",
    "PartAttentionNet",
    "STClassifier",
    "SVHNNet",
    "make_cnn",
    "make_fcn",
    "make_transform",
]

ARCHITECTURES = ("fcn", "cnn", "st-fcn", "st-cnn")


def make_fcn(in_features: int, hidden: Sequence[int], out: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    """Flatten -> (Linear -> ReLU [-> Dropout]) per hidden width [-> Linear(out)]."""
    layers: list[nn.Module] = [nn.Flatten()]
    c = in_features
    for w in hidden:
        layers += [nn.Linear(c, w), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        c = w
    if out is not None:
        layers.append(nn.Linear(c, out))
    return nn.Sequential(*layers)


def make_cnn(in_channels: int, channels: Sequence[int], kernels: Sequence[int]) -> nn.Sequential:
    """(Conv 'same' -> ReLU -> MaxPool 2x2, ceil) blocks."""
    if len(channels) != len(kernels):
        raise ValueError(f"channels {tuple(channels)} and kernels {tuple(kernels)} differ in length")
    layers: list[nn.Module] = []
    c = in_channels
    for w, k in zip(channels, kernels, strict=True):
        layers += [nn.Conv2d(c, w, k, padding=k // 2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        c = w
    return nn.Sequential(*layers)


def _flat_size(module: nn.Module, shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *shape)).flatten(1).shape[1])


def make_transform(name: str, tps_points: int = 4):
    """A 2D transform template: ``affine``, ``projective``, ``tps`` (``tps_points``² control points), ``attention``."""
    if name == "affine":
        return Affine(2)
    if name == "projective":
        return Projective(2)
    if name == "attention":
        return Attention(2)
    if name == "tps":
        return ThinPlateSpline(uniform_control_points((tps_points, tps_points)))
    raise ValueError(f"unknown transform {name!r}; choose from affine, projective, tps, attention")


class STClassifier(nn.Module):
    """``architecture`` in ``fcn``, ``cnn``, ``st-fcn``, ``st-cnn``; ``transformers`` parallel STs.

    Args:
        in_shape: ``(C, H, W)`` of the input.
        classes: output classes (logits ``(N, classes)``).
        transform: ``affine``, ``projective`` or ``tps`` for the ST models.
        st_output: transformer output size ``(h, w)`` (default: the input's).
        st_pool: average pooling of the transformer output before the classifier (the paper
            downsamples by 2 for RTS and TC).
        transformers: parallel transformers (2 for the addition experiment's 2xST-FCN).
        fcn_hidden, cnn_channels, cnn_kernels, dropout: the classifier.
        cnn_hidden: widths of fully connected ReLU layers between the CNN's conv blocks and its
            linear output (none by default, as in the paper's Table 1 CNN).
        loc_hidden, loc_channels, loc_kernel, loc_features: the localization network.
        tps_points: control points per axis of ``tps``.
    """

    def __init__(
        self,
        architecture: str = "st-cnn",
        in_shape: Sequence[int] = (1, 28, 28),
        classes: int = 10,
        transform: str = "affine",
        st_output: Sequence[int] | None = None,
        st_pool: int = 1,
        transformers: int = 1,
        fcn_hidden: Sequence[int] = (128, 128),
        cnn_channels: Sequence[int] = (32, 32),
        cnn_kernels: Sequence[int] = (9, 7),
        cnn_hidden: Sequence[int] = (),
        dropout: float = 0.0,
        loc_hidden: Sequence[int] = (32, 32, 32),
        loc_channels: Sequence[int] = (20, 20),
        loc_kernel: int = 5,
        loc_features: int = 50,
        tps_points: int = 4,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        c, h, w = (int(s) for s in in_shape)
        self.architecture = architecture
        self.transformer: nn.Module | None = None
        if architecture.startswith("st-"):
            out = tuple(st_output) if st_output else (h, w)
            sts = []
            for _ in range(transformers):
                if architecture == "st-fcn":
                    loc = make_fcn(c * h * w, loc_hidden)
                    feats = loc_hidden[-1]
                else:
                    body = make_cnn(c, loc_channels, [loc_kernel] * len(loc_channels))
                    loc = nn.Sequential(
                        body, nn.Flatten(), nn.Linear(_flat_size(body, (c, h, w)), loc_features), nn.ReLU()
                    )
                    feats = loc_features
                sts.append(SpatialTransformer(loc, make_transform(transform, tps_points), feats, output_size=out))
            self.transformer = sts[0] if transformers == 1 else MultiSpatialTransformer(sts)
            c, h, w = c * transformers, out[0], out[1]
            self.pool = int(st_pool)
            h, w = -(-h // self.pool), -(-w // self.pool)
        else:
            self.pool = 1
        if architecture.endswith("fcn"):
            self.classifier = make_fcn(c * h * w, fcn_hidden, classes, dropout)
        else:
            body = make_cnn(c, cnn_channels, cnn_kernels)
            head = make_fcn(_flat_size(body, (c, h, w)), cnn_hidden, classes, dropout)[1:]
            # Flat layers: without hidden layers the keys stay those of checkpoints saved before
            # cnn_hidden existed (body, flatten, dropout, linear).
            self.classifier = nn.Sequential(body, nn.Flatten(), nn.Dropout(dropout), *head)

    def transformed(self, x: Tensor) -> Tensor:
        """What the classifier sees: the (pooled) transformer output, or ``x`` for plain models."""
        if self.transformer is None:
            return x
        out = self.transformer(x)
        return F.avg_pool2d(out, self.pool, ceil_mode=True) if self.pool > 1 else out

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.transformed(x))


class CoLocalizer(nn.Module):
    """Attention transformer that crops a digit-sized window, and a fixed encoder embedding the crop.

    The paper's co-localization model is an ST with an attention transform (scale and translation)
    and an encoding function ``e()`` made of the first layers of a CNN pre-trained for MNIST
    classification and kept fixed. Here:

    * ``encoder`` is the conv blocks of a small MNIST classifier (``encoder`` + ``classifier``, see
      :meth:`pretrain_step`); :class:`~stnreg.paper.task.CoLocalizationTask` pre-trains it on plain
      28x28 digits of all classes and freezes it before the co-localization training. The
      embedding is its flattened feature map, L2-normalized (squared distances lie in [0, 4], the
      scale the hinge margin is set for).
    * the localization network is fully convolutional ('valid' convolutions on a ``loc_pool``-times
      downsampled input, so it is translation-equivariant and cannot favour a place of the image,
      such as a corner, by itself) and ends in a one-channel heatmap; the window's centre is the
      heatmap's soft-argmax (softmax with inverse temperature ``beta``), clamped so the window stays
      inside the image. A regression head (the paper's usual localization net, tried first) drifts
      to one corner for every image, where crops are empty and alike.
    * the scale is not learnt: the window is ``crop / size`` of the input (a digit-sized window,
      what the IoU > 0.5 score compares with the digit's 28x28 frame); :meth:`attention` takes a
      larger ``scale`` for the task's coarse-to-fine schedule.

    Args:
        size: canvas size (84); crop: the window's output size (28).
        loc_channels, loc_kernel, loc_pool: the localization network's conv widths, kernel size and
            input downsampling.
        beta: inverse temperature of the soft-argmax.
        enc_channels, enc_kernel: the encoder's conv blocks (each with 2x2 max pooling).
        classes, hidden: the pre-training classifier on top of the encoder.
    """

    def __init__(
        self,
        size: int = 84,
        crop: int = 28,
        loc_channels: Sequence[int] = (16, 32, 32),
        loc_kernel: int = 5,
        loc_pool: int = 2,
        beta: float = 10.0,
        enc_channels: Sequence[int] = (16, 32),
        enc_kernel: int = 5,
        classes: int = 10,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(loc_pool)] if loc_pool > 1 else []
        c = 1
        for w in loc_channels:
            layers += [nn.Conv2d(c, w, loc_kernel), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.Conv2d(c, 1, 1))
        self.localization = nn.Sequential(*layers)
        with torch.no_grad():
            # Non-negative read-out of ReLU features, a mild tilt toward ink; at initialization the
            # heatmap is still nearly flat (windows near the centre, ~7% IoU > 0.5 on coloc-T).
            self.localization[-1].weight.abs_()
        # Heatmap pixel i is pooled pixel i + offset ('valid' convolutions trim kernel // 2 a side).
        self._heat_offset = len(loc_channels) * (loc_kernel // 2)
        self.loc_pool, self.beta = int(loc_pool), float(beta)
        self.encoder = make_cnn(1, enc_channels, [enc_kernel] * len(enc_channels))
        feats = _flat_size(self.encoder, (1, crop, crop))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(feats, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes)
        )
        self.size, self.crop = size, crop

    @property
    def window_scale(self) -> float:
        """The window's size relative to the input (``crop / size``)."""
        return self.crop / self.size

    def centre(self, x: Tensor) -> Tensor:
        """Soft-argmax of the localization heatmap: window centres ``(N, 2)`` = ``x, y`` in [-1, 1]."""
        h = self.localization(x)
        n, _, hh, ww = h.shape
        logits = self.beta * h.flatten(1)
        # Floor at max - 50 (weights >= e^-50 ~ 2e-22): once the heatmap is peaked, the rest of the
        # softmax would underflow to subnormal floats, which slow CPU training about 10x.
        logits = torch.maximum(logits, logits.amax(1, keepdim=True).detach() - 50.0)
        p = F.softmax(logits, 1).reshape(n, hh, ww)

        def axis(k: int, extent: int) -> Tensor:
            pix = self.loc_pool * (torch.arange(k, device=x.device, dtype=x.dtype) + self._heat_offset)
            return (pix + self.loc_pool / 2) / extent * 2 - 1

        cx = (p.sum(1) * axis(ww, x.shape[-1])).sum(1)
        cy = (p.sum(2) * axis(hh, x.shape[-2])).sum(1)
        return torch.stack([cx, cy], 1)

    def attention(self, x: Tensor, scale: float | None = None) -> Tensor:
        """Attention parameters ``(N, 3)`` = ``s, t_x, t_y``; ``s`` = ``scale`` or :attr:`window_scale`."""
        s = self.window_scale if scale is None else float(scale)
        t = self.centre(x).clamp(-(1 - s), 1 - s)
        return torch.cat([torch.full_like(t[:, :1], s), t], 1)

    def window(self, x: Tensor) -> Tensor:
        """Predicted sampling windows ``(N, 4)`` = ``x0, y0, x1, y1`` in input pixels."""
        p = self.attention(x)
        s, t = p[:, :1], p[:, 1:]
        return torch.cat([(t - s + 1) * self.size / 2, (t + s + 1) * self.size / 2], 1)

    def sample_window(self, x: Tensor, params: Tensor) -> Tensor:
        """Crops ``(N, 1, crop, crop)`` of ``x`` at attention parameters ``params`` ``(N, 3)``."""
        coords = Attention(2).with_params(params).sampling_grid((self.crop, self.crop)).to(x.dtype)
        return sample(x, coords, "linear", "zeros")

    def crops(self, x: Tensor, scale: float | None = None) -> Tensor:
        """The attended windows ``(N, 1, crop, crop)``."""
        return self.sample_window(x, self.attention(x, scale))

    def embed(self, crops: Tensor) -> Tensor:
        """L2-normalized encoder features ``(N, F)`` of crops ``(N, 1, crop, crop)``."""
        return F.normalize(self.encoder(crops).flatten(1), dim=1)

    def forward(self, x: Tensor, scale: float | None = None) -> Tensor:
        """Embeddings ``(N, F)`` of the attended crops."""
        return self.embed(self.crops(x, scale))

    def pretrain_step(self, digits: Tensor) -> Tensor:
        """Class logits ``(N, classes)`` of 28x28 digits ``(N, 1, crop, crop)`` (encoder pre-training)."""
        return self.classifier(self.encoder(digits))


def _localizer(channels: int, features: int = 32) -> nn.Module:
    """A size-agnostic localization CNN (global average pooling) for feature maps of any shape."""
    from ..nets.localization import LocalizationCNN

    return LocalizationCNN(channels, 2, (32, 32), features)


class SVHNNet(nn.Module):
    """Multi-digit SVHN classifier: conv blocks, a hidden layer, and one 11-way head per digit position.

    Args:
        size: input size (64 or 128).
        st: ``"none"``, ``"single"`` (one transformer at the input) or ``"multi"`` (one before each of
            the first four conv blocks, on the feature maps), as the paper's ST-CNN Single / Multi.
        channels: conv block widths (each halves the resolution).
        hidden: width of the fully connected layer.
        transform: transform family of the transformers.
    Output: logits ``(N, 5, 11)`` (class 10 = no digit).
    """

    def __init__(
        self,
        size: int = 64,
        st: str = "single",
        channels: Sequence[int] = (48, 64, 128, 160),
        hidden: int = 512,
        transform: str = "affine",
    ) -> None:
        super().__init__()
        if st not in ("none", "single", "multi"):
            raise ValueError(f"st must be 'none', 'single' or 'multi', got {st!r}")
        self.blocks = nn.ModuleList()
        self.transformers = nn.ModuleList()
        c = 3
        for i, w in enumerate(channels):
            if (st == "multi" and i < 4) or (st == "single" and i == 0):
                self.transformers.append(SpatialTransformer(_localizer(c), make_transform(transform), 32))
            else:
                self.transformers.append(nn.Identity())
            self.blocks.append(
                nn.Sequential(
                    nn.Conv2d(c, w, 5, padding=2),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2, ceil_mode=True),
                )
            )
            c = w
        side = size
        for _ in channels:
            side = -(-side // 2)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3)
        )
        self.heads = nn.Linear(hidden, 5 * 11)

    def forward(self, x: Tensor) -> Tensor:
        for st, block in zip(self.transformers, self.blocks, strict=True):
            x = block(st(x))
        return self.heads(self.fc(x)).reshape(-1, 5, 11)


class PartAttentionNet(nn.Module):
    """The paper's CUB model in small: ``K`` parallel attention transformers crop parts of the image,
    one shared backbone embeds each crop, and a linear layer classifies the concatenated features.

    The paper's backbone is an ImageNet-pretrained Inception; no pretrained weights are used here
    (none can be downloaded in this project), so ``backbone`` is a plain CNN trained from scratch.

    Args:
        transformers: ``K`` (2 or 4 in the paper).
        crop: output size of each crop.
        channels: backbone conv widths; classes: 200.
    The heads start at half-size windows spread over the image (left/right for 2, quadrants for 4,
    centred otherwise).
    """

    def __init__(
        self, transformers: int = 2, crop: int = 112, channels: Sequence[int] = (32, 64, 128), classes: int = 200
    ):
        super().__init__()
        sts = [
            SpatialTransformer(_localizer(3, 64), Attention(2), 64, output_size=(crop, crop))
            for _ in range(transformers)
        ]
        spread = {2: [(-0.25, 0.0), (0.25, 0.0)], 4: [(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)]}
        offsets = spread.get(transformers, [(0.0, 0.0)] * transformers)
        with torch.no_grad():
            for st, (ox, oy) in zip(sts, offsets, strict=True):
                st.head.bias.copy_(torch.tensor([0.5, ox, oy]))
        self.transformers = nn.ModuleList(sts)
        body = make_cnn(3, channels, [3] * len(channels))
        self.backbone = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels[-1] * transformers, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.cat([self.backbone(st(x)) for st in self.transformers], 1))
