"""All-convolutional 1-D network: size and dispersion classes plus continuous estimates with a variance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from qdsize.sim.errors import bad


@dataclass
class ModelConfig:
    """Architecture: one entry per convolution in `channels`, `kernels`, `strides`."""

    channels: list[int] = field(default_factory=lambda: [32, 48, 64, 96, 128])
    kernels: list[int] = field(default_factory=lambda: [9, 7, 5, 5, 3])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2])
    dropout: float = 0.1
    norm: str = "batch"  # batch | group | none
    position_channel: bool = True  # a third input channel with the position on the Q grid (-1 ... 1)
    n_size_classes: int = 10
    n_dispersion_classes: int = 4

    def __post_init__(self):
        n = len(self.channels)
        if n < 1:
            raise bad("model.channels", self.channels, "at least one convolution")
        for name in ("kernels", "strides"):
            v = getattr(self, name)
            if len(v) != n:
                raise bad(f"model.{name}", v, f"{n} entries, one per convolution (as in model.channels)")
            if any(int(x) < 1 for x in v):
                raise bad(f"model.{name}", v, "positive integers")
        if any(int(c) < 1 for c in self.channels):
            raise bad("model.channels", self.channels, "positive integers")
        if not 0 <= self.dropout < 1:
            raise bad("model.dropout", self.dropout, "a probability 0 <= p < 1")
        if self.norm not in ("batch", "group", "none"):
            raise bad("model.norm", self.norm, "one of batch, group, none")
        if self.n_size_classes < 2 or self.n_dispersion_classes < 2:
            raise bad("model.n_size_classes", self.n_size_classes, "at least 2 classes per head")

    def to_dict(self) -> dict:
        return asdict(self)


def normalise_input(intensity: torch.Tensor, mask: torch.Tensor | None = None,
                    position: bool = False) -> torch.Tensor:
    """Channels independent of the pattern's overall scale: asinh(I / mean I), the coverage mask and, if asked,
    the position on the grid (-1 at its first point, 1 at its last).

    The mean is taken over the covered points only; masked points are zero in the first two channels. The position
    lets the convolutions tell low-Q from high-Q peaks, which global pooling alone cannot (a width that grows with
    Q is strain or thermal motion, one that does not is size).
    """
    x = intensity.float()
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    scale = (x * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    scale = torch.where(scale.abs() > 0, scale.abs(), torch.ones_like(scale))
    y = torch.asinh(x / scale) * m
    channels = [y, m]
    if position:
        channels.append(torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype).expand_as(x))
    return torch.stack(channels, dim=1)


class QDNet(nn.Module):
    """Strided 1-D convolutions, global average pooling, linear heads (so class-activation maps are exact)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        layers: list[nn.Module] = []
        cin = 3 if c.position_channel else 2
        for cout, k, s in zip(c.channels, c.kernels, c.strides):
            layers.append(nn.Conv1d(cin, cout, k, stride=s, padding=k // 2, bias=c.norm == "none"))
            if c.norm == "batch":
                layers.append(nn.BatchNorm1d(cout))
            elif c.norm == "group":
                layers.append(nn.GroupNorm(math.gcd(8, cout), cout))  # groups must divide the channels
            layers.append(nn.GELU())
            if c.dropout > 0:
                layers.append(nn.Dropout1d(c.dropout) if hasattr(nn, "Dropout1d") else nn.Dropout(c.dropout))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.size_head = nn.Linear(cin, c.n_size_classes)
        self.dispersion_head = nn.Linear(cin, c.n_dispersion_classes)
        self.regression_head = nn.Linear(cin, 4)  # mean diameter, dispersion: (value, log variance) each
        # post-hoc calibration on the validation split (temperature scaling, variance scaling): 1 = none
        self.register_buffer("size_temperature", torch.ones(()))
        self.register_buffer("dispersion_temperature", torch.ones(()))
        self.register_buffer("mean_diameter_var_scale", torch.ones(()))
        self.register_buffer("dispersion_var_scale", torch.ones(()))
        # out-of-distribution reference: pooled features of held-out training-like data (Mahalanobis)
        self.register_buffer("ood_mean", torch.zeros(cin))
        self.register_buffer("ood_precision", torch.eye(cin))
        self.register_buffer("ood_threshold", torch.tensor(float("inf")))

    def feature_maps(self, intensity: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(normalise_input(intensity, mask, self.config.position_channel))

    def pooled(self, intensity: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.feature_maps(intensity, mask).mean(dim=-1)

    def ood_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance^2 / n_features of pooled features from the reference set (about 1 in-distribution)."""
        d = pooled - self.ood_mean
        return torch.einsum("bi,ij,bj->b", d, self.ood_precision, d) / d.shape[-1]

    @torch.no_grad()
    def fit_ood(self, pooled: torch.Tensor, quantile: float = 0.995) -> float:
        """Set the reference from pooled features of in-distribution data; the threshold is their quantile."""
        mean = pooled.mean(0)
        cov = torch.cov((pooled - mean).T) + 1e-4 * torch.eye(pooled.shape[1], device=pooled.device)
        self.ood_mean.copy_(mean)
        self.ood_precision.copy_(torch.linalg.inv(cov))
        thr = torch.quantile(self.ood_score(pooled), quantile)
        self.ood_threshold.copy_(thr * 1.5)
        return float(self.ood_threshold)

    def forward(self, intensity: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Intensities (batch, n_q) on the model grid; mask (batch, n_q), 1 where the pattern is measured."""
        pooled = self.pooled(intensity, mask)
        reg = self.regression_head(pooled)
        return {"size_logits": self.size_head(pooled) / self.size_temperature,
                "dispersion_logits": self.dispersion_head(pooled) / self.dispersion_temperature,
                "mean_diameter": reg[:, 0],
                "mean_diameter_logvar": reg[:, 1].clamp(-12, 6) + torch.log(self.mean_diameter_var_scale),
                "dispersion": reg[:, 2],
                "dispersion_logvar": reg[:, 3].clamp(-12, 6) + torch.log(self.dispersion_var_scale),
                "ood_score": self.ood_score(pooled)}

    def class_activation_map(self, intensity: torch.Tensor, mask: torch.Tensor | None = None,
                             head: str = "size", target: torch.Tensor | None = None) -> torch.Tensor:
        """CAM over the Q grid (batch, n_q) for the predicted (or given) class of a head, upsampled linearly."""
        fmap = self.feature_maps(intensity, mask)
        lin = self.size_head if head == "size" else self.dispersion_head
        if target is None:
            target = lin(fmap.mean(dim=-1)).argmax(dim=-1)
        w = lin.weight[target]  # (batch, C)
        cam = torch.einsum("bc,bcl->bl", w, fmap)
        return F.interpolate(cam[:, None], size=intensity.shape[-1], mode="linear", align_corners=False)[:, 0]


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else Apple MPS, else CPU."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
