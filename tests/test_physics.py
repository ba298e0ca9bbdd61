"""Physics of the simulated patterns: Bragg positions, size broadening, dispersion, strain, size distributions."""

import numpy as np
import pytest

from qdsize.sim import cluster, crystal, debye, distribution, pattern, scattering
from qdsize.sim.errors import InputError

PBS_BRAGG = {"111": 1.833, "200": 2.117, "220": 2.994, "311": 3.511, "222": 3.667, "400": 4.234}


def _interference(stats, q, **kw):
    """I(Q) divided by the self scattering: peaks of the lattice sit where the interference function peaks."""
    i_q = debye.intensity(stats, q, **kw)[0]
    self_ = stats.atom_counts[0] @ (np.abs(scattering.form_factors(stats.species, q)) ** 2)
    return i_q / self_


def _peak(q, y, q0, half_width=0.08):
    m = (q > q0 - half_width) & (q < q0 + half_width)
    return q[m][np.argmax(y[m])]


def test_pbs_bragg_peaks_of_a_10nm_sphere_sit_at_the_lattice_positions():
    c = cluster.cut(crystal.pbs(), "sphere", 10.0)
    assert c.n_atoms == 20005  # Pb-centred 10 nm sphere (physics notes)
    q = np.arange(1.5, 4.5, 0.0005)
    f = _interference(debye.lattice_statistics(c), q)
    for hkl, q0 in PBS_BRAGG.items():
        h, k, l = (int(x) for x in hkl)
        exact = 2 * np.pi * np.sqrt(h * h + k * k + l * l) / crystal.PBS_A_ANGSTROM
        assert abs(exact - q0) < 1e-3
        assert abs(_peak(q, f, exact) - exact) < 2e-3, hkl


def test_integral_breadth_scales_as_inverse_diameter():
    q = np.arange(2.3, 3.7, 0.0005)
    products = []
    for d in (4.0, 6.0, 8.0, 10.0):
        c = cluster.cut(crystal.pbs(), "sphere", d)
        f = _interference(debye.lattice_statistics(c), q)
        q0 = PBS_BRAGG["220"]
        half = 10.0 / (c.diameter_nm * 10.0)  # window a fixed number of peak widths wide
        m = (q > q0 - half) & (q < q0 + half)
        x, y = q[m], f[m]
        y = y - np.interp(x, [x[0], x[-1]], [y[0], y[-1]])
        products.append(np.trapezoid(y, x) / y.max() * c.diameter_nm)
    products = np.array(products)
    assert np.all(np.abs(products / products.mean() - 1) < 0.10), products


def _tail_weight(q, i_q, q0=2.994):
    """Mean height 1.5-2.5 half-widths from the (220) maximum, relative to the peak, in units of its own HWHM."""
    j = np.argmin(np.abs(q - q0))
    j = j - 200 + int(np.argmax(i_q[j - 200:j + 200]))
    base = min(i_q[(q > 2.6) & (q < 2.8)].min(), i_q[(q > 3.15) & (q < 3.35)].min())
    y = i_q - base
    left, right = j, j
    while y[left] > y[j] / 2:
        left -= 1
    while y[right] > y[j] / 2:
        right += 1
    d = np.abs(q - q[j]) / ((q[right] - q[left]) / 2)
    return np.mean(y[(d > 1.5) & (d < 2.5)]) / y[j]


def test_dispersion_raises_the_tails_of_the_peaks():
    q = np.arange(2.3, 3.7, 0.0005)
    mono = [_tail_weight(q, pattern.simulate(q, diameter_nm=d).intensity) for d in (5.0, 6.0, 8.0)]
    poly = _tail_weight(q, pattern.simulate(q, diameter_nm=6.0, size_dispersion_pct=20.0).intensity)
    # monodisperse peaks share one shape whatever the size; a size distribution adds heavier tails
    assert max(mono) / min(mono) < 1.1
    assert poly > 1.15 * max(mono)


def test_uniform_strain_moves_every_peak_by_exactly_the_strain():
    c = cluster.cut(crystal.pbs(), "sphere", 5.0)
    stats = debye.lattice_statistics(c)
    eps = 0.01
    q = np.linspace(1.0, 9.0, 801)
    strained = debye.sinc_sums(q, stats.distances_angstrom * (1 + eps), stats.pair_counts)
    scaled_q = debye.sinc_sums(q * (1 + eps), stats.distances_angstrom, stats.pair_counts)
    np.testing.assert_allclose(strained, scaled_q, rtol=1e-12, atol=1e-9)
    # and the Bragg peak of a 10 nm sphere moves to Q0 / (1 + eps)
    c10 = debye.lattice_statistics(cluster.cut(crystal.pbs(), "sphere", 10.0))
    qq = np.arange(4.0, 4.4, 0.0002)
    p0 = _peak(qq, _interference(c10, qq), PBS_BRAGG["400"])
    p1 = _peak(qq, _interference(c10, qq, strain=eps), PBS_BRAGG["400"] / (1 + eps))
    assert abs(p1 - p0 / (1 + eps)) < 5e-4


def test_strain_matches_a_rescaled_crystal_exactly():
    q = np.linspace(0.5, 10, 400)
    c = cluster.cut(crystal.pbs(), "cube", 3.0)
    stretched = cluster.Cluster(c.elements, c.positions_angstrom * 1.007, c.grid_index,
                                c.grid_vectors_angstrom * 1.007, c.volume_per_atom_angstrom3)
    base, big = debye.lattice_statistics(c), debye.lattice_statistics(stretched)
    np.testing.assert_allclose(debye.intensity(base, q, strain=0.007), debye.intensity(big, q), rtol=1e-10)


def test_microstrain_is_the_exact_average_over_lattice_parameters():
    stats = debye.lattice_statistics(cluster.cut(crystal.pbs(), "sphere", 2.5))
    q = np.linspace(1.0, 10.0, 300)
    sigma = 0.004
    x, w = np.polynomial.hermite_e.hermegauss(60)  # probabilists' Hermite: weight exp(-x^2/2)
    avg = sum(wi * debye.intensity(stats, q, strain=sigma * xi)[0] for xi, wi in zip(x, w)) / w.sum()
    exact = debye.intensity(stats, q, strain_rms=sigma)[0]
    np.testing.assert_allclose(exact, avg, rtol=1e-9)
    # microstrain damps high-Q oscillations relative to the unstrained pattern
    plain = debye.intensity(stats, q)[0]
    assert np.std(np.diff(exact[q > 7])) < np.std(np.diff(plain[q > 7]))


def test_zero_dispersion_limit_equals_the_single_cluster_pattern():
    ladder = cluster.cut_ladder(crystal.pbs(), "sphere", np.geomspace(3, 5, 12))
    stats = debye.lattice_statistics(ladder)
    q = np.linspace(1, 10, 300)
    k = 5
    single = debye.intensity(stats, q, b_iso=0.8)[k]
    p0 = pattern.compose(stats, q, stats.diameters_nm[k], 0.0, b_iso=0.8)
    np.testing.assert_allclose(p0.intensity, single, rtol=1e-12)
    p_small = pattern.compose(stats, q, stats.diameters_nm[k], 1e-4, b_iso=0.8)
    np.testing.assert_allclose(p_small.intensity, single, rtol=1e-4)
    assert p0.params["size_dispersion_pct"] == pytest.approx(0.0, abs=1e-12)


def test_ladder_weights_sum_to_one_keep_the_mean_and_vary_smoothly():
    d = np.geomspace(1.0, 40, 170)  # steps of 2.2 %, wide enough to hold every distribution below
    for mean, disp in [(3.0, 5.0), (6.3, 12.0), (10.0, 25.0), (4.44, 0.0)]:
        w = distribution.ladder_weights(d, mean, disp)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(w >= 0)
        m, s = distribution.realised_labels(d, w)
        assert m == pytest.approx(mean, rel=1e-6)
        # realised dispersion exceeds the requested by at most the ladder step mixing (steps are ~2.2 %)
        assert disp - 0.05 <= s <= np.hypot(disp, 1.2)
    w1 = distribution.ladder_weights(d, 6.0, 10.0)
    w2 = distribution.ladder_weights(d, 6.001, 10.0)
    assert np.abs(w1 - w2).sum() < 2e-3


def test_lognormal_parameters_give_the_requested_moments():
    mu, s = distribution.lognormal_params(7.0, 15.0)
    mean = np.exp(mu + s * s / 2)
    std = mean * np.sqrt(np.exp(s * s) - 1)
    assert mean == pytest.approx(7.0, rel=1e-12)
    assert std / mean == pytest.approx(0.15, rel=1e-12)


def test_equal_volume_diameter_uses_the_bulk_volume_per_atom():
    c = cluster.cut(crystal.pbs(), "cube", 5.0)
    v = crystal.PBS_A_ANGSTROM**3 / 8
    assert c.diameter_nm == pytest.approx((6 * c.n_atoms * v / np.pi) ** (1 / 3) / 10, rel=1e-12)
    for shape in ("sphere", "cube", "cuboctahedron", "truncated_octahedron", "octahedron"):
        # atom-centred cubes grow by whole pairs of planes (5.5 -> 6.3 nm): the tolerance is half that step
        tol = 0.4 if shape == "cube" else 0.15
        assert abs(cluster.cut(crystal.pbs(), shape, 6.0).diameter_nm - 6.0) < tol, shape


def test_a_polyhedron_named_by_its_facet_ratio_is_the_named_shape_of_that_ratio():
    xt = crystal.pbs()
    for shape in ("octahedron", "truncated_octahedron", "cuboctahedron"):
        rho = float(cluster.FACET_RATIO[shape])
        a = cluster.cut(xt, shape, 4.0, centre="random", seed=3)
        b = cluster.cut(xt, f"polyhedron:{rho!r}", 4.0, centre="random", seed=3)
        assert np.array_equal(a.positions_angstrom, b.positions_angstrom), shape
        assert b.info["shape"] == f"polyhedron:{rho!r}" and b.info["facet_ratio"] == rho
    # between the named ones: the atom count at one gauge grows with the facet ratio (more {111} cut away)
    cloud = np.random.default_rng(0).uniform(-20.0, 20.0, (20000, 3))
    n = [int((cluster.gauge(f"polyhedron:{r}", cloud) <= 12.0).sum()) for r in (0.6, 0.7, 1.0, 1.5, 3.0)]
    assert n == sorted(n) and n[0] < n[-1]
    with pytest.raises(InputError, match="polyhedron:RHO"):
        cluster.cut(xt, "polyhedron:abc", 3.0)
    with pytest.raises(InputError, match="facet_ratio = 0.3"):
        cluster.cut(xt, "polyhedron:0.3", 3.0)


def test_octahedra_are_cut_whole_at_every_size():
    # an octahedron's vertices lie 0.73 equal-volume diameters from its centre, beyond the 0.55 a sphere needs
    assert cluster._half_extent_per_diameter("octahedron") == pytest.approx((np.pi / 8) ** (1 / 3), rel=0.01)
    assert cluster._half_extent_per_diameter("cube") == pytest.approx((np.pi / 6) ** (1 / 3) / 2, rel=0.01)
    ladder = cluster.cut_ladder(crystal.pbs(), "octahedron", [3.0, 8.0, 12.0], centre="random", seed=1)
    assert [round(c.diameter_nm) for c in ladder] == [3, 8, 12]
    for c in ladder:  # whole: the farthest atom is the vertex, |x| + |y| + |z| is the gauge
        r = np.abs(c.positions_angstrom).sum(axis=1).max()
        assert r == pytest.approx(c.info["gauge_angstrom"], abs=crystal.PBS_A_ANGSTROM)


def test_surfaces_change_composition_as_named():
    xt = crystal.pbs()
    as_cut = cluster.cut(xt, "sphere", 4.0).counts()
    stoich = cluster.cut(xt, "sphere", 4.0, surface="stoichiometric").counts()
    rich = cluster.cut(xt, "sphere", 4.0, surface="cation_rich", anion_removal=0.6).counts()
    assert stoich["Pb"] == stoich["S"]
    assert rich["Pb"] == as_cut["Pb"] and rich["S"] < as_cut["S"]
    assert rich["Pb"] > rich["S"]


def test_random_centring_is_reproducible_and_different_from_atom_centring():
    xt = crystal.pbs()
    a = cluster.cut(xt, "sphere", 3.0, centre="random", seed=4)
    b = cluster.cut(xt, "sphere", 3.0, centre="random", seed=4)
    c = cluster.cut(xt, "sphere", 3.0, centre="atom")
    np.testing.assert_array_equal(a.positions_angstrom, b.positions_angstrom)
    assert a.n_atoms != c.n_atoms or not np.allclose(a.positions_angstrom, c.positions_angstrom)


def test_anomalous_scattering_lowers_the_lead_form_factor_near_its_edges():
    q = np.array([2.0])
    f_plain = scattering.form_factors(["Pb"], q)[0, 0]
    f_mo = scattering.form_factors(["Pb"], q, energy_kev=17.479)[0, 0]  # Mo K-alpha, above the Pb L3 edge
    assert f_mo.real < f_plain.real - 1.0 and f_mo.imag > 3.0
    assert scattering.wavelength_angstrom(17.479) == pytest.approx(0.7093, abs=1e-3)


def test_two_theta_and_q_grids_round_trip():
    tt = np.linspace(5, 140, 50)
    lam = 0.5594
    np.testing.assert_allclose(scattering.two_theta_from_q(scattering.q_from_two_theta(tt, lam), lam), tt,
                               rtol=1e-12)
    g = scattering.q_grid(1.0, 10.0, 0.005)
    assert g.size == 1801 and g[-1] == pytest.approx(10.0)


def test_a_narrow_distribution_between_two_shell_closures_still_simulates():
    """0.5 % around 2.65 nm meets a single shell closure on the default ladder: the ladder widens to bracket it."""
    from qdsize.sim import pattern

    q = np.arange(1.0, 6.0, 0.01)
    p = pattern.simulate(q, diameter_nm=2.648748719756762, size_dispersion_pct=0.5)
    assert abs(p.params["mean_diameter_nm"] - 2.648748719756762) < 1e-3
    assert p.params["n_ladder_sizes"] >= 2 and np.all(np.isfinite(p.intensity))
