"""Physics of the augmentation: determinism, identity at zero strength, Poisson statistics, solvent peaks, resolution,
Q errors, finiteness and config validation."""

import numpy as np
import pytest
import torch

from qdsize.sim import augment, solvents
from qdsize.sim.errors import InputError

Q = np.arange(1.0, 10.0 + 1e-9, 0.005)  # default model grid
OFF = {k: {"enabled": False} for k in augment.SECTIONS}


def only(**sections):
    d = {k: dict(v) for k, v in OFF.items()}
    for k, v in sections.items():
        d[k] = {"enabled": True, **v}
    return d


def gaussian_peaks(q, centres, fwhm=0.04, height=1000.0, floor=10.0):
    s = fwhm / 2.3548
    return floor + sum(height * np.exp(-0.5 * ((q - c) / s) ** 2) for c in centres)


@pytest.fixture(scope="module")
def pbs():
    from qdsize.sim import cluster, crystal, debye

    c = cluster.cut(crystal.pbs(), "sphere", 4.0)
    return debye.intensity(debye.lattice_statistics(c), Q, b_iso={"Pb": 1.0, "S": 1.0})[0]


@pytest.fixture(scope="module")
def default_aug():
    return augment.from_config({"preset": "default"}, Q)


def batch_of(pattern, n=64):
    return torch.as_tensor(np.tile(pattern, (n, 1)), dtype=torch.float32)


def test_deterministic_with_a_seed_and_different_between_seeds(default_aug, pbs):
    x = batch_of(pbs)
    a = default_aug(x, torch.Generator().manual_seed(3))
    b = default_aug(x, torch.Generator().manual_seed(3))
    c = default_aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # every sample draws its own strengths


@pytest.mark.parametrize("section,settings", [
    ("compton", {"fraction": 0.0}),
    ("solvent", {"ratio": 0.0}),
    ("capillary", {"ratio": [0.0, 0.0]}),
    ("resolution", {"fwhm0_inv_angstrom": 0.0, "fwhm_relative": 0.0}),
    ("calibration", {"zero_shift_inv_angstrom": 0.0, "scale_error": 0.0}),
    ("background", {"flat_fraction": 0.0, "poly_fraction": 0.0}),
    ("scale", {"factor": 1.0}),
    ("gaps", {"probability": 0.0}),
    ("counts", {"probability": 0.0}),
])
def test_zero_strength_is_the_identity(section, settings, pbs):
    x = batch_of(pbs, 8)
    aug = augment.Augmenter(only(**{section: settings}), Q)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)
    assert torch.equal(augment.from_config({"preset": "none"}, Q)(x, torch.Generator()), x)


def test_poisson_variance_equals_mean():
    # a flat pattern: every point expects max_counts counts, exact (inversion) and normal branches both tested
    for top in (3.0, 12.0, 400.0, 1e5):
        x = torch.ones(400, 200)
        aug = augment.Augmenter(only(counts={"max_counts": top, "readout_sigma_counts": 0.0}), np.linspace(1, 2, 200))
        counts = aug(x, torch.Generator().manual_seed(1)) * top
        n = counts.numel()
        mean, var = counts.mean().item(), counts.var().item()
        assert abs(mean - top) < 5 * np.sqrt(top / n)
        assert abs(var / top - 1) < 5 * np.sqrt(2 / n) + (1 / 12) / top  # rounding adds 1/12 in the normal branch
        assert torch.allclose(counts, counts.round(), rtol=1e-6, atol=1e-4) and counts.min() >= 0  # integers


# First sharp peak of each liquid where the literature puts it (sources cited in sim/solvents.py):
# toluene 1.28-1.35 (reference work's measured toluene 1.28; Katayama & Ozutsumi X-ray study ~1.3), hexane 1.41
# (reference work; Bochynski & Drozdowski, Acta Phys. Pol. A 88, 1089 (1995)), octane ~1.40 (same series; Habenschuss
# & Narten, J. Chem. Phys. 92, 5692 (1990)), chloroform ~1.3 (Pothoczki, Temleitner & Pusztai, Chem. Rev. 115, 13308
# (2015)), water 2.0 (Hura et al., J. Chem. Phys. 113, 9140 (2000)).
LITERATURE_PEAK = {"toluene": (1.28, 1.35), "hexane": (1.38, 1.44), "octane": (1.37, 1.43),
                   "chloroform": (1.25, 1.36), "water": (1.95, 2.05)}


@pytest.mark.parametrize("name", solvents.SOLVENTS)
def test_solvent_first_peak_where_literature_puts_it(name):
    q = np.arange(0.5, 10.0 + 1e-9, 0.005)
    i = solvents.solvent_intensity(name, q)
    win = (q > 0.8) & (q < 3.0)
    lo, hi = LITERATURE_PEAK[name]
    assert lo <= q[win][np.argmax(i[win])] <= hi
    assert np.all(np.isfinite(i)) and np.all(i >= 0)
    assert i[-1] < 0.5 * i[win].max()  # slowly decaying high-Q floor below the first peak


def test_molecule_geometries_have_bond_lengths():
    for name in solvents.SOLVENTS:
        els, pos = solvents.molecule(name)
        r = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        np.fill_diagonal(r, np.inf)
        assert 0.9 < r.min() < 1.2, name  # X-H bonds
        assert "H" in els
    els, pos = solvents.molecule("hexane")
    assert els.count("C") == 6 and els.count("H") == 14


def test_capillary_humps_at_documented_positions():
    q = np.arange(0.8, 10.0, 0.005)
    for m, (lo, hi) in {"borosilicate": (1.5, 1.65), "kapton": (1.15, 1.35)}.items():
        i = solvents.capillary_intensity(m, q)
        assert lo <= q[np.argmax(i)] <= hi


def test_compton_rises_to_the_atomic_number():
    s = solvents.incoherent_s("Pb", np.array([0.0, 5.0, 40.0]))
    assert s[0] < 0.1 and s[0] < s[1] < s[2] and 0.97 * 82 < s[2] <= 82
    h = solvents.incoherent_s("H", np.array([0.0, 30.0]))
    assert h[0] < 1e-3 and abs(h[1] - 1) < 1e-3


@pytest.mark.parametrize("q", [Q, np.concatenate([np.arange(1.0, 4.0, 0.004), np.arange(4.0, 10.0, 0.008)])])
def test_broadening_conserves_integrated_intensity(q):
    x = torch.as_tensor(gaussian_peaks(q, [3.0, 5.5], floor=0.0)[None], dtype=torch.float64)
    dq = np.gradient(q)
    for w0, rel in ((0.03, 0.0), (0.0, 0.006), (0.05, 0.004)):
        aug = augment.Augmenter(only(resolution={"fwhm0_inv_angstrom": w0, "fwhm_relative": rel}), q)
        y = aug(x, torch.Generator().manual_seed(0))[0].numpy()
        i0, i1 = np.sum(x[0].numpy() * dq), np.sum(y * dq)
        assert abs(i1 / i0 - 1) < 1e-3
        assert y.max() < x.max().item()
        # second moment of the peak at 5.5 grows by the kernel variance
        sel = (q > 4.5) & (q < 6.5)
        var = lambda v: np.sum(v[sel] * dq[sel] * (q[sel] - 5.5) ** 2) / np.sum(v[sel] * dq[sel])  # noqa: E731
        want = (w0**2 + (rel * 5.5) ** 2) / 2.3548**2
        assert abs(var(y) - var(x[0].numpy()) - want) < 0.1 * want + 2e-6


def pseudo_voigt(q, q0, fwhm, eta):
    """Area-normalised pseudo-Voigt profile (per 1/A)."""
    gauss = np.exp(-4 * np.log(2) * ((q - q0) / fwhm) ** 2) * 2 * np.sqrt(np.log(2) / np.pi) / fwhm
    lorentz = 2 / (np.pi * fwhm) / (1 + 4 * ((q - q0) / fwhm) ** 2)
    return (1 - eta) * gauss + eta * lorentz


@pytest.mark.parametrize("q", [Q, np.concatenate([np.arange(1.0, 4.0, 0.004), np.arange(4.0, 10.0, 0.008)])])
def test_pseudo_voigt_conserves_intensity_and_eta_zero_is_the_gaussian(q):
    x = torch.as_tensor(gaussian_peaks(q, [1.2, 3.0, 5.5, 9.8], floor=0.0)[None], dtype=torch.float64)
    dq = np.gradient(q)
    law = {"fwhm0_inv_angstrom": 0.04, "fwhm_relative": 0.004}
    out = {eta: augment.Augmenter(only(resolution={**law, "lorentz_fraction": eta}), q)(
        x, torch.Generator().manual_seed(0))[0].numpy() for eta in (0.0, 0.3, 1.0)}
    gaussian = augment.Augmenter(only(resolution=law), q)(x, torch.Generator().manual_seed(0))[0].numpy()
    assert np.array_equal(out[0.0], gaussian)
    i0 = np.sum(x[0].numpy() * dq)
    for eta, y in out.items():
        assert abs(np.sum(y * dq) / i0 - 1) < 1e-6, eta  # tails reflected at the grid's ends, none lost
        assert np.all(y > -1e-9 * y.max())
    far = np.abs(q - 7.5) < 0.2  # 1.6 1/A (~25 FWHM) from any peak: only Lorentzian tails reach here
    assert out[1.0][far].min() > 100 * max(out[0.0][far].max(), 1e-300)
    assert out[0.3][far].mean() == pytest.approx(0.3 * out[1.0][far].mean(), rel=0.02)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("w0,rel", [(0.05, 0.0), (0.0, 0.006), (0.02, 0.003)])
@pytest.mark.parametrize("q0", [1.5, 5.5, 9.5])
def test_a_sharp_line_comes_out_as_the_profile_of_its_width(q0, eta, w0, rel):
    # a one-cell line: the pseudo-Voigt of FWHM(q0), averaged over the line's cell and each output cell (a
    # triangle of two cells); within 4 % of the peak, as the line keeps its position only to within a u cell
    i0 = int(np.argmin(np.abs(Q - q0)))
    x = torch.zeros(1, Q.size, dtype=torch.float64)
    x[0, i0] = 1.0 / 0.005
    aug = augment.Augmenter(only(resolution={"fwhm0_inv_angstrom": w0, "fwhm_relative": rel,
                                             "lorentz_fraction": eta}), Q)
    y = aug(x, torch.Generator().manual_seed(0))[0].numpy()
    fwhm = np.hypot(w0, rel * Q[i0])
    offsets = np.linspace(-0.005, 0.005, 41)
    weights = (1 - np.abs(offsets) / 0.005) / np.sum(1 - np.abs(offsets) / 0.005)
    want = sum(w * pseudo_voigt(Q, Q[i0] + o, fwhm, eta) for o, w in zip(offsets, weights))
    near = np.abs(Q - Q[i0]) < 3 * fwhm
    assert np.abs(y - want)[near].max() < 0.04 * want.max()
    if eta == 0:  # (Lorentzian tails reflected at the grid's ends move the centroid inwards)
        assert np.sum(y * Q) / np.sum(y) == pytest.approx(Q[i0], abs=0.05 * fwhm)


@pytest.mark.parametrize("shift,scale", [(0.02, 0.0), (0.0, 0.004), (-0.013, -0.002)])
def test_calibration_moves_a_bragg_peak_by_the_stated_amount(shift, scale):
    q0 = 3.4
    x = torch.as_tensor(gaussian_peaks(Q, [q0])[None], dtype=torch.float32)
    aug = augment.Augmenter(only(calibration={"zero_shift_inv_angstrom": shift, "scale_error": scale}), Q)
    y = aug(x, torch.Generator().manual_seed(0))[0].numpy() - 10.0
    sel = np.abs(Q - q0) < 0.1
    centroid = np.sum(Q[sel] * y[sel]) / np.sum(y[sel])
    assert abs(centroid - (q0 * (1 + scale) + shift)) < 5e-4


def test_detector_gaps_zero_one_window_of_the_stated_width():
    x = torch.rand(200, Q.size, generator=torch.Generator().manual_seed(0)) + 1.0
    aug = augment.Augmenter(only(gaps={"probability": 1.0, "number": 1, "width_inv_angstrom": 0.1}), Q)
    y = aug(x, torch.Generator().manual_seed(1))
    zero = y == 0
    assert torch.equal(y[~zero], x[~zero])
    width = zero.sum(1)
    inside = (Q[None, :] * zero.numpy()).sum(1) / np.maximum(width.numpy(), 1)  # window centres
    full = (inside > Q[0] + 0.06) & (inside < Q[-1] - 0.06)
    assert full.mean() > 0.9 and set(width[full].tolist()) <= {19, 20}  # |Q - centre| < 0.05: 19 or 20 points
    runs = (zero[:, 1:] & ~zero[:, :-1]).sum(1) + zero[:, 0]
    assert (runs <= 1).all()


def test_output_finite_and_nonnegative_where_it_must(pbs):
    x = torch.cat([batch_of(pbs, 32), torch.zeros(2, Q.size), 1e-30 * batch_of(pbs, 2), 1e12 * batch_of(pbs, 2)])
    raw = augment.config_from({"preset": "default", "subtraction": {"enabled": False}})
    for cfg in (augment.config_from({"preset": "default"}), raw, augment.config_from({"preset": "realistic"})):
        y = augment.Augmenter(cfg, Q)(x, torch.Generator().manual_seed(5))
        assert torch.isfinite(y).all()
    y = augment.Augmenter(raw, Q)(x, torch.Generator().manual_seed(5))
    assert (y >= 0).all()  # raw (unsubtracted) intensities and counts are never negative


def test_works_on_other_grids_and_devices_dtype(pbs):
    q = np.linspace(0.5, 14.0, 700) ** 1.1  # non-uniform, increasing
    aug = augment.from_config({"preset": "default", "gaps": {"probability": 1.0}}, q)
    x = torch.rand(16, q.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100 + 1
    y = aug(x, torch.Generator().manual_seed(1))
    assert y.dtype == torch.float64 and y.shape == x.shape and torch.isfinite(y).all()


def test_solvent_ratio_is_the_integral_ratio(pbs):
    x = batch_of(pbs, 4)
    aug = augment.Augmenter(only(solvent={"names": ["toluene"], "ratio": 2.0}), Q)
    y = aug(x, torch.Generator().manual_seed(0)).double()
    dq = np.gradient(Q)
    added = ((y - x.double()) * torch.as_tensor(dq)).sum(1) / (x.double() * torch.as_tensor(dq)).sum(1)
    assert torch.allclose(added, torch.full_like(added, 2.0), rtol=1e-3)


def test_solvent_dilation_moves_its_peaks_and_keeps_the_ratio(pbs):
    """A liquid we did not tabulate: toluene stretched along Q by k has its first peak at k times toluene's."""
    x = batch_of(pbs, 2)
    dq = torch.as_tensor(np.gradient(Q))
    win = (Q > 0.8) & (Q < 3.0)
    plain = augment.Augmenter(only(solvent={"names": ["toluene"], "ratio": 2.0}), Q)
    same = augment.Augmenter(only(solvent={"names": ["toluene"], "ratio": 2.0, "dilation": 1.0}), Q)
    torch.testing.assert_close(same(x, torch.Generator().manual_seed(0)), plain(x, torch.Generator().manual_seed(0)))
    base = solvents.solvent_intensity("toluene", Q)
    peak0 = Q[win][np.argmax(base[win])]
    for k in (0.8, 1.5):
        aug = augment.Augmenter(only(solvent={"names": ["toluene"], "ratio": 2.0, "dilation": k}), Q)
        added = (aug(x, torch.Generator().manual_seed(0)) - x).double()
        ratio = (added * dq).sum(1) / (x.double() * dq).sum(1)
        assert torch.allclose(ratio, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-3)
        curve = added[0].numpy()
        assert Q[win][np.argmax(curve[win])] == pytest.approx(k * peak0, abs=0.015)
    drawn = augment.Augmenter(only(solvent={"names": ["toluene"], "ratio": 1.0, "dilation": [0.7, 1.5]}), Q)
    peaks = [Q[win][np.argmax((drawn(x[:1], torch.Generator().manual_seed(i)) - x[:1])[0].numpy()[win])]
             for i in range(12)]
    assert 0.7 * peak0 - 0.02 <= min(peaks) < max(peaks) <= 1.5 * peak0 + 0.02 and max(peaks) - min(peaks) > 0.2


@pytest.mark.parametrize("d,field", [
    ({"solvent": {"dilation": [0.0, 1.2]}}, "augment.solvent.dilation"),
    ({"counts": {"max_counts": -3}}, "augment.counts.max_counts = -3"),
    ({"counts": {"max_counts": [1e6, 1e2]}}, "augment.counts.max_counts"),
    ({"solvent": {"names": ["benzine"]}}, "augment.solvent.names = 'benzine'"),
    ({"resolution": {"fwhm0_inv_angstrom": "wide"}}, "augment.resolution.fwhm0_inv_angstrom = 'wide'"),
    ({"capillary": {"probability": 1.5}}, "augment.capillary.probability = 1.5"),
    ({"noise": {}}, "augment.noise"),
    ({"counts": {"enabled": "yes"}}, "augment.counts.enabled = 'yes'"),
    ({"background": {"poly_degree": 2.5}}, "augment.background.poly_degree = 2.5"),
    ({"compton": {"elements": {"Xx": 1}}}, "augment.compton.elements"),
    ({"resolution": {"lorentz_fraction": 1.5}}, "augment.resolution.lorentz_fraction = 1.5"),
])
def test_bad_configuration_is_rejected_naming_the_field(d, field):
    with pytest.raises(InputError) as e:
        augment.AugmentConfig.from_dict(d)
    assert field in str(e.value) and "expected" in str(e.value)


def test_presets_load_and_overrides_merge():
    c = augment.config_from({"preset": "default", "counts": {"max_counts": [1000, 2000]}, "scale.factor": 2.0})
    assert c.counts.max_counts == (1000.0, 2000.0) and c.scale.factor == (2.0, 2.0)
    assert c.solvent.names == list(solvents.SOLVENTS)
    r = augment.config_from({"preset": "realistic"})
    assert r.solvent.names == ["toluene"] and r.counts.max_counts == (1e5, 1e5)
    with pytest.raises(InputError, match="augment.preset"):
        augment.config_from({"preset": "nope"})


def test_drawn_resolution_is_what_was_applied(pbs):
    x = batch_of(pbs, 256)
    cfg = only(resolution={"probability": 0.5, "fwhm0_inv_angstrom": [0.01, 0.03], "fwhm_relative": 0.002,
                           "lorentz_fraction": [0.0, 0.2]})
    drawn: dict = {}
    y = augment.from_config(cfg, Q)(x, torch.Generator().manual_seed(0), drawn=drawn)
    r = drawn["resolution"]
    assert r.shape == (256, 3)
    applied = r[:, 0] > 0
    assert 0.3 < applied.float().mean() < 0.7  # the probability gate
    assert ((r[applied, 0] >= 0.01) & (r[applied, 0] <= 0.03)).all() and (r[applied, 1] == 0.002).all()
    assert (r[~applied] == 0).all()  # not broadened: the instrument is perfect
    assert torch.equal(y[~applied], x[~applied]) and not torch.allclose(y[applied], x[applied])
    # the draw of one sample reproduces its pattern through a fixed-resolution augmenter
    i = int(torch.nonzero(applied)[0])
    f0, rel, eta = (float(v) for v in r[i])
    one = augment.from_config(only(resolution={"probability": 1.0, "fwhm0_inv_angstrom": f0, "fwhm_relative": rel,
                                               "lorentz_fraction": eta}), Q)(x[:1])
    torch.testing.assert_close(one[0], y[i], rtol=1e-4, atol=1e-3)


def test_instrument_width_is_drawn_log_uniformly_above_zero_and_uniformly_from_zero(pbs):
    """A width is a scale: from 0.005 to 0.05 1/A every factor is as likely (median at the geometric mean); a range
    that starts at 0 is drawn uniformly (median at the middle)."""
    x = batch_of(pbs, 2048)
    for lo, hi, median in ((0.005, 0.05, (0.005 * 0.05) ** 0.5), (0.0, 0.05, 0.025)):
        cfg = only(resolution={"probability": 1.0, "fwhm0_inv_angstrom": [lo, hi], "fwhm_relative": 0.0})
        drawn: dict = {}
        augment.from_config(cfg, Q)(x, torch.Generator().manual_seed(1), drawn=drawn)
        w = drawn["resolution"][:, 0].double()
        assert ((w >= lo) & (w <= hi)).all()
        assert float(w.median()) == pytest.approx(median, rel=0.12)
    assert augment.log_range("resolution", "fwhm0_inv_angstrom", (0.005, 0.05))
    assert not augment.log_range("resolution", "fwhm0_inv_angstrom", (0.0, 0.05))
    assert augment.log_range("counts", "max_counts", (1e2, 1e6)) and not augment.log_range("solvent", "ratio", (1, 2))
