"""Instrument resolution from a calibrant: reflection lists, exact recovery of the width law, agreement with the
augmentation's own resolution model, and `qdsize resolution` end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qdsize.sim import augment, calibrant, measured
from qdsize.sim.errors import InputError


def qdsize(*args):
    return subprocess.run([sys.executable, "-m", "qdsize.platform", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_reflections_follow_each_standards_extinction_rule():
    def first(name, n):
        return ["".join(map(str, hkl)) for hkl, _ in calibrant.reflections(name, 0.5, 8.0)[:n]]

    assert first("Si", 6) == ["111", "220", "311", "400", "331", "422"]  # diamond: no 200, no 222
    assert first("CeO2", 5) == ["111", "200", "220", "311", "222"]  # fcc
    assert first("lab6", 5) == ["100", "110", "111", "200", "210"]  # primitive
    (_, q111), = calibrant.reflections("Si", 1.9, 2.1)
    assert q111 == pytest.approx(2 * np.pi * np.sqrt(3) / 5.431144)
    with pytest.raises(InputError, match="standard = 'NaCl'"):
        calibrant.check_standard("NaCl")


def test_width_law_and_axis_error_are_recovered_exactly_from_pseudo_voigt_lines():
    q = np.arange(1.0, 10.0, 0.004)
    fwhm0, rel, eta, shift, scale = 0.022, 0.0025, 0.12, 0.003, 0.001
    y = np.full_like(q, 40.0) + 2.0 * q
    for _, qc in calibrant.reflections("CeO2", 1.0, 10.0):
        y += 50.0 * np.exp(-qc / 5) * calibrant.pseudo_voigt(q, qc * (1 + scale) + shift,
                                                             np.hypot(fwhm0, rel * qc), eta)
    fit = calibrant.fit_resolution(q, y, "CeO2")
    assert fit.fwhm0_inv_angstrom == pytest.approx(fwhm0, rel=2e-3)
    assert fit.fwhm_relative == pytest.approx(rel, rel=5e-3)
    assert fit.lorentz_fraction == pytest.approx(eta, abs=0.01)
    assert fit.zero_shift_inv_angstrom == pytest.approx(shift, abs=2e-4)
    assert fit.scale_error == pytest.approx(scale, abs=1e-4)
    assert sum(ln.used for ln in fit.lines) >= 10 and fit.rms_fwhm_misfit_inv_angstrom < 1e-4
    assert fit.argument.startswith("0.022,0.0025")


@pytest.mark.parametrize("fwhm0,rel,eta", [(0.02, 0.002, 0.0), (0.035, 0.004, 0.15)])
def test_calibrant_broadened_by_the_augmentation_gives_back_its_resolution(fwhm0, rel, eta):
    """What `--resolution` tells the network is what the augmentation broadened training patterns with: a calibrant
    measured on an instrument of that resolution must give the same numbers back, through counting noise."""
    q = np.arange(0.8, 12.0, 0.002)
    x = np.full_like(q, 2.0)
    for _, qc in calibrant.reflections("Si", 0.8, 12.0):  # sharp lines, area kept between the two nearest cells
        i = int(np.searchsorted(q, qc)) - 1
        f = (qc - q[i]) / (q[1] - q[0])
        x[i] += 2000.0 * np.exp(-qc / 5) * (1 - f)
        x[i + 1] += 2000.0 * np.exp(-qc / 5) * f
    cfg = {k: {"enabled": False} for k in augment.SECTIONS}
    cfg["resolution"] = {"enabled": True, "probability": 1.0, "fwhm0_inv_angstrom": fwhm0, "fwhm_relative": rel,
                         "lorentz_fraction": eta}
    cfg["counts"] = {"enabled": True, "probability": 1.0, "max_counts": 1e5, "readout_sigma_counts": 0.0}
    y = augment.Augmenter(cfg, q)(torch.as_tensor(x[None]), torch.Generator().manual_seed(0))[0].numpy()
    fit = calibrant.fit_resolution(q, y, "Si")
    assert fit.fwhm0_inv_angstrom == pytest.approx(fwhm0, rel=0.04)
    assert fit.fwhm_relative == pytest.approx(rel, rel=0.08)
    assert fit.lorentz_fraction == pytest.approx(eta, abs=0.05)
    assert abs(fit.zero_shift_inv_angstrom) < 1e-3 and abs(fit.scale_error) < 2e-4


def test_qdsize_resolution_reads_two_theta_prints_the_predict_argument_and_refuses_a_non_calibrant(tmp_path):
    wavelength = 0.5594  # Ag K-alpha
    q = np.arange(1.0, 9.0, 0.003)
    y = np.full_like(q, 100.0)
    for _, qc in calibrant.reflections("LaB6", 1.0, 9.0):
        y += 30.0 * calibrant.pseudo_voigt(q, qc, np.hypot(0.03, 0.003 * qc), 0.05)
    two_theta = np.degrees(2 * np.arcsin(q * wavelength / (4 * np.pi)))
    path = measured.write_pattern_file(tmp_path / "lab6.xy", two_theta, y, x_unit="2theta",
                                       wavelength_angstrom=wavelength)
    r = qdsize("resolution", path, "--standard", "LaB6", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fwhm0_inv_angstrom"] == pytest.approx(0.03, rel=0.01)
    assert out["fwhm_relative"] == pytest.approx(0.003, rel=0.03)
    assert out["resolution_argument"].startswith("0.03,0.003")
    png = tmp_path / "widths.png"
    r = qdsize("resolution", path, "--standard", "lab6", "--plot", png)
    assert r.returncode == 0, r.stderr
    assert "qdsize predict SAMPLES --resolution 0.03" in r.stdout and png.stat().st_size > 10_000
    noise = measured.write_pattern_file(tmp_path / "noise.xy", q,
                                        np.random.default_rng(0).poisson(100, q.size).astype(float), x_unit="q_A")
    r = qdsize("resolution", noise, "--standard", "Si")
    assert r.returncode == 2 and "usable Si lines" in r.stderr and "Traceback" not in r.stderr
    r = qdsize("resolution", path, "--standard", "corundum")
    assert r.returncode == 2 and "standard = 'corundum'" in r.stderr and "Traceback" not in r.stderr
