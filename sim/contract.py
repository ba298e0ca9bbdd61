"""The names every layer shares: dataset splits, label columns, the registered model, and the instrument resolution."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np

from .errors import InputError

SPLITS = ("train", "val", "test", "benchmark", "seedgrid")
FROZEN_SPLITS = ("benchmark", "seedgrid")  # simulated once with a fixed augmentation: the named scores
LABEL_COLUMNS = ("mean_diameter_nm", "size_dispersion_pct", "size_class", "dispersion_class")
REGISTERED_MODEL = "qdsize-pbs"


@dataclass(frozen=True)
class Resolution:
    """An instrument's resolution: pseudo-Voigt FWHM(Q) = sqrt(fwhm0^2 + (fwhm_relative Q)^2) in 1/A, Lorentzian
    fraction eta; what the augmentation broadens with, `qdsize resolution` measures and the network is told."""

    fwhm0_inv_angstrom: float
    fwhm_relative: float
    lorentz_fraction: float = 0.0

    LIMITS = (0.5, 0.1, 1.0)  # the largest value each field may take

    def __post_init__(self):
        for f, hi in zip(fields(self), self.LIMITS):
            v = getattr(self, f.name)
            if not (np.isfinite(v) and 0 <= v <= hi):
                raise InputError(f"resolution {f.name} = {v!r}: expected 0 <= value <= {hi}")

    @classmethod
    def parse(cls, value) -> "Resolution":
        """From "FWHM0,REL[,ETA]", a sequence of 2 or 3 numbers, or a Resolution."""
        if isinstance(value, cls):
            return value
        try:
            parts = value.split(",") if isinstance(value, str) else list(value)
            numbers = [float(v) for v in parts]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) not in (2, 3) or not all(np.isfinite(numbers)):
            raise InputError(f"resolution = {value!r}: expected fwhm0 (1/A), fwhm_relative and optionally the "
                             "Lorentzian fraction, e.g. 0.02,0.002 or 0.02,0.002,0.1")
        return cls(*numbers)

    def as_tuple(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in astuple(self))

    @property
    def argument(self) -> str:
        """The value for `qdsize predict --resolution`."""
        return f"{self.fwhm0_inv_angstrom:.3g},{self.fwhm_relative:.3g},{self.lorentz_fraction:.2g}"

    def fwhm_at(self, q_inv_angstrom) -> np.ndarray:
        q = np.asarray(q_inv_angstrom, dtype=float)
        return np.sqrt(self.fwhm0_inv_angstrom**2 + (self.fwhm_relative * q) ** 2)


RESOLUTION_KEYS = tuple(f.name for f in fields(Resolution))
