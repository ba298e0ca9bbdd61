"""All-convolutional 1-D network: size and dispersion classes plus continuous estimates with a variance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from qdsize.sim.contract import LABEL_COLUMNS
from qdsize.sim.errors import bad


@dataclass
class ModelConfig:
    """Architecture: one entry per convolution in `channels`, `kernels`, `strides`."""

    channels: list[int] = field(default_factory=lambda: [32, 48, 64, 96, 128])
    kernels: list[int] = field(default_factory=lambda: [9, 7, 5, 5, 3])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2])
    dropout: float = 0.0
    norm: str = "batch"  # batch | group | none
    position_channel: bool = True  # a third input channel with the position on the Q grid (-1 ... 1)
    resolution_input: bool = True  # four more channels: the instrument resolution, when the user knows it
    n_size_classes: int = 10
    n_dispersion_classes: int = 4
    # class edges (set from the dataset by training): the reported class probabilities are then those of the
    # reported density over each class (the continuous estimate's Gaussian, fused with the class head when the
    # fusion power is above 0), so class, value and uncertainty are one answer (None: the class heads' softmax, as
    # models saved before did)
    size_edges_nm: list[float] | None = None
    dispersion_edges_pct: list[float] | None = None

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
        for name, n in (("size_edges_nm", self.n_size_classes), ("dispersion_edges_pct", self.n_dispersion_classes)):
            edges = getattr(self, name)
            if edges is not None and (len(edges) != n + 1 or any(b <= a for a, b in zip(edges, edges[1:]))):
                raise bad(f"model.{name}", edges, f"{n + 1} increasing class edges")

    def to_dict(self) -> dict:
        return asdict(self)


# the continuous estimates, under their label names (mean_diameter_nm, size_dispersion_pct), are learned on a
# normalised scale: (value - centre) / scale
TARGETS = LABEL_COLUMNS[:2]
TARGET_SCALE = {"mean_diameter_nm": (7.0, 3.0), "size_dispersion_pct": (12.5, 7.5)}
# the calibration buffers' names in models saved before the estimates took the label names: old -> new
RENAMED_BUFFERS = {"mean_diameter_var_scale": "mean_diameter_nm_var_scale",
                   "dispersion_var_scale": "size_dispersion_pct_var_scale",
                   "mean_diameter_var_power": "mean_diameter_nm_var_power",
                   "dispersion_var_power": "size_dispersion_pct_var_power",
                   "mean_diameter_fusion_power": "mean_diameter_nm_fusion_power",
                   "dispersion_fusion_power": "size_dispersion_pct_fusion_power"}


def current_state_names(state: dict) -> dict:
    """A saved state dict under today's buffer names (`RENAMED_BUFFERS`), so models saved before keep loading."""
    return {RENAMED_BUFFERS.get(k, k): v for k, v in state.items()}


def interval_probs(mean: torch.Tensor, std: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """(batch, n_classes) probability of each class [e_k, e_k+1) under N(mean, std) restricted to the classes' range
    (the labels lie in it); an estimate far outside the range, with all its mass beyond, goes to the nearest end."""
    e = torch.as_tensor(edges, dtype=mean.dtype, device=mean.device)
    p = torch.diff(torch.special.ndtr((e[None, :] - mean[:, None]) / std[:, None].clamp_min(1e-6)), dim=1)
    total = p.sum(dim=1, keepdim=True)
    end = F.one_hot((mean > e[-1]).long() * (len(edges) - 2), len(edges) - 1).to(p.dtype)
    return torch.where(total > 1e-12, p.clamp_min(0.0) / total.clamp_min(1e-12), end)


def _fusion_terms(mean, std, head_probs, edges, power):
    """Per class: the unnormalised mass of the fused density, and its first and second moments about `mean` (in units
    of std). The outer classes reach to -inf and +inf with the density of their nominal width."""
    e = torch.as_tensor(edges, dtype=mean.dtype, device=mean.device)
    inner = e[1:-1]
    big = inner.new_full((1,), 40.0)  # +-40 standard deviations: the normal's mass and density there are 0
    std = std.clamp_min(1e-6)
    z = (inner[None, :] - mean[:, None]) / std[:, None]
    a = torch.cat([-big.expand(len(mean), 1), z.clamp(-40, 40)], dim=1)
    b = torch.cat([z.clamp(-40, 40), big.expand(len(mean), 1)], dim=1)
    pdf_a, pdf_b = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi), torch.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    gauss = (torch.special.ndtr(b) - torch.special.ndtr(a)).clamp_min(0.0)
    weight = (head_probs.clamp_min(1e-12) / torch.diff(e)[None, :]) ** power
    return weight * gauss, weight * (pdf_a - pdf_b), weight * (gauss + a * pdf_a - b * pdf_b)


def fuse(mean: torch.Tensor, std: torch.Tensor, head_probs: torch.Tensor, edges: list[float],
         power: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Product of the two experts of one quantity: the continuous estimate's N(mean, std) times the class head's
    piecewise-constant density (probability / class width) to the power `power`. Returns the fused density's mean, its
    standard deviation and its mass in each class. The class head can say what one Gaussian cannot (a skewed or
    two-sided answer, a class edge the estimate sits on); power 0 is the Gaussian alone."""
    m0, m1, m2 = _fusion_terms(mean, std, head_probs, edges, power)
    s0 = m0.sum(dim=1).clamp_min(1e-30)
    shift = m1.sum(dim=1) / s0  # mean - Gaussian mean, in units of std
    var = (m2.sum(dim=1) / s0 - shift * shift).clamp_min(1e-6)
    return mean + std * shift, std * torch.sqrt(var), m0 / s0[:, None]


def fused_nll(mean: torch.Tensor, std: torch.Tensor, head_probs: torch.Tensor, edges: list[float],
              power: float | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `target` under the fused density of `fuse` (up to a constant)."""
    m0, _, _ = _fusion_terms(mean, std, head_probs, edges, power)
    e = torch.as_tensor(edges, dtype=mean.dtype, device=mean.device)
    k = torch.bucketize(target, e[1:-1], right=True)
    log_w = power * torch.log(head_probs.clamp_min(1e-12).gather(1, k[:, None])[:, 0] / torch.diff(e)[k])
    z = (target - mean) / std.clamp_min(1e-6)
    return (0.5 * z * z + torch.log(std.clamp_min(1e-6)) - log_w + torch.log(m0.sum(dim=1).clamp_min(1e-30))).mean()


# Instrument resolution as the augmentation draws it: pseudo-Voigt FWHM(Q) = sqrt(fwhm0^2 + (fwhm_relative Q)^2) with
# Lorentzian fraction eta. Scales: the tops of the default training ranges (sim/presets/default.yaml).
RESOLUTION_SCALE = (0.05, 0.006, 0.2)


def resolution_channels(resolution: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(batch, 4, n_q) constant channels: 1 where the resolution is known, then its three parameters scaled to about
    0-1 (zeros where unknown). `resolution` is (batch, 3) or (3,) in RESOLUTION_KEYS order, NaN rows unknown."""
    b, n = like.shape
    if resolution is None:
        return like.new_zeros(b, 4, n)
    r = torch.as_tensor(resolution, dtype=like.dtype, device=like.device).reshape(-1, 3).expand(b, 3)
    known = torch.isfinite(r).all(dim=1, keepdim=True).to(like.dtype)
    scaled = torch.nan_to_num(r / r.new_tensor(RESOLUTION_SCALE)) * known
    return torch.cat([known, scaled], dim=1)[:, :, None].expand(b, 4, n)


def normalise_input(intensity: torch.Tensor, mask: torch.Tensor | None = None,
                    position: bool = False, resolution: torch.Tensor | None = None,
                    resolution_input: bool = False) -> torch.Tensor:
    """Channels independent of the pattern's overall scale: asinh(I / mean I), the coverage mask and, if asked,
    the position on the grid (-1 at its first point, 1 at its last).

    The mean is taken over the covered points only; masked points are zero in the first two channels. The position
    lets the convolutions tell low-Q from high-Q peaks, which global pooling alone cannot (a width that grows with
    Q is strain or thermal motion, one that does not is size). With `resolution_input`, four channels say what the
    instrument's resolution is, when known (`resolution_channels`): an instrument width the network is told need not
    be guessed from the line shape, which is what limits the size of large dots.
    """
    x = intensity.float()
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    scale = (x * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    scale = torch.where(scale.abs() > 0, scale.abs(), torch.ones_like(scale))
    y = torch.asinh(x / scale) * m
    channels = [y, m]
    if position:
        channels.append(torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype).expand_as(x))
    out = torch.stack(channels, dim=1)
    if resolution_input:
        out = torch.cat([out, resolution_channels(resolution, x)], dim=1)
    return out


class QDNet(nn.Module):
    """Strided 1-D convolutions, global average pooling, linear heads (so class-activation maps are exact)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        layers: list[nn.Module] = []
        cin = 2 + int(c.position_channel) + 4 * int(c.resolution_input)
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
        self.register_buffer("mean_diameter_nm_var_scale", torch.ones(()))
        self.register_buffer("size_dispersion_pct_var_scale", torch.ones(()))
        # calibrated variance = var_scale x (predicted variance) ^ var_power (models saved before: power 1)
        self.register_buffer("mean_diameter_nm_var_power", torch.ones(()))
        self.register_buffer("size_dispersion_pct_var_power", torch.ones(()))
        # the reported estimate fuses the continuous Gaussian with the class head's density to this power (`fuse`;
        # 0 = the Gaussian alone, as in models saved before)
        self.register_buffer("mean_diameter_nm_fusion_power", torch.zeros(()))
        self.register_buffer("size_dispersion_pct_fusion_power", torch.zeros(()))
        # and the fused class masses are temperature-scaled (the two experts see the same features: their product is
        # overconfident)
        self.register_buffer("size_fusion_temperature", torch.ones(()))
        self.register_buffer("dispersion_fusion_temperature", torch.ones(()))
        # out-of-distribution reference: pooled features of held-out training-like data (Mahalanobis)
        self.register_buffer("ood_mean", torch.zeros(cin))
        self.register_buffer("ood_precision", torch.eye(cin))
        self.register_buffer("ood_threshold", torch.tensor(float("inf")))

    def feature_maps(self, intensity: torch.Tensor, mask: torch.Tensor | None = None,
                     resolution: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        return self.features(normalise_input(intensity, mask, c.position_channel, resolution, c.resolution_input))

    def pooled(self, intensity: torch.Tensor, mask: torch.Tensor | None = None,
               resolution: torch.Tensor | None = None) -> torch.Tensor:
        return self.feature_maps(intensity, mask, resolution).mean(dim=-1)

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

    def forward(self, intensity: torch.Tensor, mask: torch.Tensor | None = None,
                resolution: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Intensities (batch, n_q) on the model grid; mask (batch, n_q), 1 where the pattern is measured;
        resolution (batch, 3) or (3,): the instrument's (RESOLUTION_KEYS), NaN or None where not known."""
        pooled = self.pooled(intensity, mask, resolution)
        reg = self.regression_head(pooled)
        out = {"size_logits": self.size_head(pooled) / self.size_temperature,
               "dispersion_logits": self.dispersion_head(pooled) / self.dispersion_temperature,
               "mean_diameter_nm": reg[:, 0],
               "mean_diameter_nm_logvar": self.calibrated_logvar("mean_diameter_nm", reg[:, 1]),
               "size_dispersion_pct": reg[:, 2],
               "size_dispersion_pct_logvar": self.calibrated_logvar("size_dispersion_pct", reg[:, 3]),
               "ood_score": self.ood_score(pooled)}
        for head, key, edges in (("size", "mean_diameter_nm", self.config.size_edges_nm),
                                 ("dispersion", "size_dispersion_pct", self.config.dispersion_edges_pct)):
            if edges is None:
                continue
            centre, scale = TARGET_SCALE[key]  # in physical units
            mean, std = out[key] * scale + centre, torch.exp(0.5 * out[key + "_logvar"]) * scale
            power = getattr(self, f"{key}_fusion_power")
            if not self.training and float(power) > 0:  # training fits the heads themselves (and needs no sync)
                mean, std, mass = fuse(mean, std, torch.softmax(out[f"{head}_logits"], -1), edges, power)
                t = getattr(self, f"{head}_fusion_temperature")
                out[f"{head}_probs"] = torch.softmax(torch.log(mass.clamp_min(1e-30)) / t, -1)
                out[key], out[key + "_logvar"] = (mean - centre) / scale, 2 * torch.log(std / scale)
            else:
                out[f"{head}_probs"] = interval_probs(mean, std, edges)
        return out

    def calibrated_logvar(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """The log variance a regression output `raw` stands for after calibration: log(a v^b), v = exp(raw)."""
        return raw.clamp(-12, 6) * getattr(self, f"{key}_var_power") + torch.log(getattr(self, f"{key}_var_scale"))

    def class_activation_map(self, intensity: torch.Tensor, mask: torch.Tensor | None = None,
                             head: str = "size", target: torch.Tensor | None = None,
                             resolution: torch.Tensor | None = None) -> torch.Tensor:
        """CAM over the Q grid (batch, n_q) for the predicted (or given) class of a head, upsampled linearly."""
        fmap = self.feature_maps(intensity, mask, resolution)
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
