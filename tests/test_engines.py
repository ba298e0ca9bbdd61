"""Both Debye engines against the float64 brute-force double sum, analytic limits, cluster counts and CIF import.

Conventions (physics notes): I(Q) = sum_i |f_i|^2 + sum_{i != j} Re(f_i f_j*) T_i T_j sin(Q r_ij) / (Q r_ij), with
f = f0 + f' + i f'' and T = exp(-B Q^2 / (16 pi^2)); self terms are not damped.
"""

import itertools

import numpy as np
import pytest

from qdsize.sim import cluster, crystal, debye
from qdsize.sim.errors import InputError

SHAPES = ("sphere", "cube", "cuboctahedron", "truncated_octahedron", "octahedron")
SURFACES = ("as_cut", "stoichiometric", "cation_rich")
CENTRES = ("atom", "random")
# per-element B (A^2) and an energy where the anomalous terms are large: Mo K-alpha above the Pb L3 edge for PbS,
# just below the Se K edge (12.66 keV) for CdSe, where f'(Se) is strongly negative
MATERIALS = {
    "pbs": dict(make=crystal.pbs, b_iso={"Pb": 0.9, "S": 1.4}, energy_kev=17.48),
    "cdse": dict(make=crystal.cdse, b_iso={"Cd": 0.7, "Se": 1.1}, energy_kev=12.5),
}
Q = np.concatenate([[0.0], np.linspace(0.05, 12.0, 96)])  # up to 12 1/A, including the Q -> 0 limit
LATTICE_TOL = 1e-9
ATOMISTIC_TOL = 1e-4


def _rel(a, ref):
    return float(np.max(np.abs(np.asarray(a) - ref) / np.abs(ref)))


def _brute(c, **kw):
    return debye.brute_force_intensity(c.elements, c.positions_angstrom, Q, **kw)


def _lattice(c, **kw):
    return debye.intensity(debye.lattice_statistics(c), Q, **kw)[0]


def _atomistic(c, **kw):
    return debye.intensity(debye.atomistic_statistics(c), Q, **kw)[0]


def _f_xraydb(element, q, energy_kev=None):
    """Form factor straight from xraydb (independent of qdsize.sim.scattering)."""
    import xraydb

    f = np.asarray(xraydb.f0(element, q / (4 * np.pi)), dtype=float).astype(complex)
    if energy_kev is not None:
        ev = energy_kev * 1e3
        f = f + float(xraydb.f1_chantler(element, ev)) + 1j * float(xraydb.f2_chantler(element, ev))
    return f


def _t(b, q):
    return np.exp(-b * q**2 / (16 * np.pi**2))


def _on_grid(elements, grid_index, grid_vectors):
    grid_index = np.asarray(grid_index, dtype=np.int64).reshape(-1, 3)
    return cluster.Cluster(np.array(elements, dtype=object), grid_index @ grid_vectors, grid_index,
                           np.asarray(grid_vectors, dtype=float))


# ---------------------------------------------------------------------------------------------------------------
# Every shape x surface x centring, PbS and CdSe, per-element B and anomalous scattering
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("material,shape,surface,centre",
                         list(itertools.product(MATERIALS, SHAPES, SURFACES, CENTRES)))
def test_engines_match_brute_force(material, shape, surface, centre):
    m = MATERIALS[material]
    c = cluster.cut(m["make"](), shape, 2.4, surface=surface, centre=centre, seed=11)
    assert 100 <= c.n_atoms <= 600, c.n_atoms
    assert c.on_grid and len(c.species) == 2
    if surface == "stoichiometric":
        assert len(set(c.counts().values())) == 1, c.counts()
    kw = dict(b_iso=m["b_iso"], energy_kev=m["energy_kev"])
    ref = _brute(c, **kw)
    assert np.all(ref > 0)
    assert _rel(_lattice(c, **kw), ref) <= LATTICE_TOL
    assert _rel(_atomistic(c, **kw), ref) <= ATOMISTIC_TOL


def test_engines_match_brute_force_without_b_or_energy_and_with_scalar_b():
    c = cluster.cut(crystal.pbs(), "cuboctahedron", 2.6, surface="cation_rich", centre="random", seed=5)
    for kw in (dict(), dict(b_iso=0.6)):
        ref = _brute(c, **kw)
        assert _rel(_lattice(c, **kw), ref) <= LATTICE_TOL
        assert _rel(_atomistic(c, **kw), ref) <= ATOMISTIC_TOL


def test_brute_force_oracle_matches_an_independent_double_sum():
    """The oracle itself, against a full i, j matrix sum with form factors taken from xraydb directly."""
    c = cluster.cut(crystal.pbs(), "sphere", 2.0, surface="cation_rich", centre="random", seed=2)
    b = {"Pb": 0.9, "S": 1.4}
    e_kev = 17.48
    els = list(c.elements)
    f = np.array([_f_xraydb(e, Q, e_kev) for e in els])  # (n, nQ)
    t = np.array([_t(b[e], Q) for e in els])
    r = np.linalg.norm(c.positions_angstrom[:, None] - c.positions_angstrom[None], axis=-1)
    off = ~np.eye(len(els), dtype=bool)
    expected = np.sum(np.abs(f) ** 2, axis=0)
    for k, q in enumerate(Q):
        amp = f[:, k] * t[:, k]
        sinc = np.sinc(q * r / np.pi)
        expected[k] += np.real(np.sum((amp[:, None] * np.conj(amp)[None, :] * sinc)[off]))
    got = debye.brute_force_intensity(c.elements, c.positions_angstrom, Q, b_iso=b, energy_kev=e_kev)
    assert _rel(got, expected) <= 1e-11


# ---------------------------------------------------------------------------------------------------------------
# Vacancies, off-lattice clusters, ladders and strain
# ---------------------------------------------------------------------------------------------------------------
def test_cluster_with_random_vacancies_still_agrees():
    full = cluster.cut(crystal.pbs(), "truncated_octahedron", 2.8, surface="as_cut", centre="atom")
    rng = np.random.default_rng(4)
    keep = rng.random(full.n_atoms) > 0.25
    c = cluster.Cluster(full.elements[keep], full.positions_angstrom[keep], full.grid_index[keep],
                        full.grid_vectors_angstrom, full.volume_per_atom_angstrom3)
    assert 100 <= c.n_atoms < full.n_atoms <= 600
    kw = dict(b_iso={"Pb": 0.9, "S": 1.4}, energy_kev=17.48)
    ref = _brute(c, **kw)
    assert _rel(_lattice(c, **kw), ref) <= LATTICE_TOL
    assert _rel(_atomistic(c, **kw), ref) <= ATOMISTIC_TOL
    assert _rel(_lattice(full, **kw), ref) > 0.05  # the vacancies do change the pattern


def test_off_lattice_cluster_atomistic_engine_agrees_and_lattice_engine_refuses():
    base = cluster.cut(crystal.cdse(), "sphere", 2.6, surface="stoichiometric")
    rng = np.random.default_rng(8)
    pos = base.positions_angstrom + rng.normal(0.0, 0.12, base.positions_angstrom.shape)
    c = cluster.from_atoms(list(base.elements), pos)
    assert not c.on_grid and 100 <= c.n_atoms <= 600
    kw = dict(b_iso={"Cd": 0.7, "Se": 1.1}, energy_kev=12.5)
    ref = _brute(c, **kw)
    stats = debye.atomistic_statistics(c)
    assert not stats.exact
    assert _rel(debye.intensity(stats, Q, **kw)[0], ref) <= ATOMISTIC_TOL
    assert _rel(debye.intensity(debye.statistics(c), Q, **kw)[0], ref) <= ATOMISTIC_TOL  # auto -> atomistic
    with pytest.raises(InputError):
        debye.lattice_statistics(c)
    with pytest.raises(InputError):
        debye.statistics(c, engine="lattice")


def test_lattice_ladder_equals_clusters_one_at_a_time():
    ladder = cluster.cut_ladder(crystal.cdse(), "cuboctahedron", [1.6, 2.2, 2.8], surface="cation_rich", seed=3)
    assert len(ladder) == 3
    together = debye.intensity(debye.lattice_statistics(ladder), Q, b_iso=0.8)
    for k, c in enumerate(ladder):
        assert _rel(together[k], _lattice(c, b_iso=0.8)) <= 1e-12
    assert _rel(together[0], _brute(ladder[0], b_iso=0.8)) <= LATTICE_TOL


def test_uniform_strain_equals_scaled_coordinates():
    c = cluster.cut(crystal.pbs(), "sphere", 2.4, surface="cation_rich", seed=1)
    kw = dict(b_iso={"Pb": 0.9, "S": 1.4})
    ref = debye.brute_force_intensity(c.elements, c.positions_angstrom * 1.012, Q, **kw)
    got = debye.intensity(debye.lattice_statistics(c), Q, strain=0.012, **kw)[0]
    assert _rel(got, ref) <= LATTICE_TOL


# ---------------------------------------------------------------------------------------------------------------
# Analytic one- and two-atom patterns
# ---------------------------------------------------------------------------------------------------------------
def _all_engines(c, **kw):
    return {"brute": _brute(c, **kw), "lattice": _lattice(c, **kw), "atomistic": _atomistic(c, **kw)}


@pytest.mark.parametrize("energy_kev", [None, 17.48])
def test_one_atom_gives_its_own_form_factor_squared(energy_kev):
    h = crystal.PBS_A_ANGSTROM / 2
    c = _on_grid(["Pb"], [[3, -1, 2]], np.eye(3) * h)
    f = _f_xraydb("Pb", Q, energy_kev)
    expected = np.abs(f) ** 2  # N |f|^2 with N = 1; the self term carries no Debye-Waller damping
    for name, got in _all_engines(c, b_iso=1.5, energy_kev=energy_kev).items():
        assert _rel(got, expected) <= 1e-12, name


@pytest.mark.parametrize("energy_kev", [None, 17.48])
def test_two_like_atoms(energy_kev):
    """Two atoms of one element at r: I = 2 |f|^2 (1 + T^2 sin(Q r) / (Q r)).

    |f e^{iQ.r1} T + f e^{iQ.r2} T|^2 averaged over orientations gives 2 |f|^2 T^2 (1 + sinc(Q r)); the total
    (Bragg + thermal diffuse) self term is undamped, which leaves 2 |f|^2 + 2 |f|^2 T^2 sinc(Q r).
    """
    h = crystal.PBS_A_ANGSTROM / 2
    c = _on_grid(["Pb", "Pb"], [[0, 0, 0], [1, 1, 0]], np.eye(3) * h)  # nearest Pb-Pb: a / sqrt 2
    r = h * np.sqrt(2)
    b = 1.3
    f = _f_xraydb("Pb", Q, energy_kev)
    expected = 2 * np.abs(f) ** 2 * (1 + _t(b, Q) ** 2 * np.sinc(Q * r / np.pi))
    for name, got in _all_engines(c, b_iso=b, energy_kev=energy_kev).items():
        assert _rel(got, expected) <= 1e-12, name


def test_two_unlike_atoms_with_anomalous_terms():
    """Pb and S at r: I = |f_Pb|^2 + |f_S|^2 + 2 Re(f_Pb f_S*) T_Pb T_S sin(Q r) / (Q r)."""
    h = crystal.PBS_A_ANGSTROM / 2
    c = _on_grid(["Pb", "S"], [[0, 0, 0], [1, 0, 0]], np.eye(3) * h)
    b = {"Pb": 0.9, "S": 1.4}
    e_kev = 17.48
    fp, fs = _f_xraydb("Pb", Q, e_kev), _f_xraydb("S", Q, e_kev)
    expected = (np.abs(fp) ** 2 + np.abs(fs) ** 2
                + 2 * np.real(fp * np.conj(fs)) * _t(b["Pb"], Q) * _t(b["S"], Q) * np.sinc(Q * h / np.pi))
    assert abs(np.imag(fp[0])) > 1  # f''(Pb) at 17.48 keV is several electrons: the test sees it
    for name, got in _all_engines(c, b_iso=b, energy_kev=e_kev).items():
        assert _rel(got, expected) <= 1e-12, name


# ---------------------------------------------------------------------------------------------------------------
# Atom counts and equal-volume diameters
# ---------------------------------------------------------------------------------------------------------------
def test_pbs_2nm_pb_centred_sphere_count_and_diameter():
    a = crystal.PBS_A_ANGSTROM
    v_atom = a**3 / 8
    # independent count: simple-cubic grid of spacing a/2 (Pb where i+j+k is even), whole shells i^2+j^2+k^2 <= m
    n = np.arange(-6, 7)
    i, j, k = (x.ravel() for x in np.meshgrid(n, n, n, indexing="ij"))
    m2 = i * i + j * j + k * k
    shells = np.unique(m2[m2 <= 30])
    cum = np.array([np.sum(m2 <= s) for s in shells])
    target = np.pi * 20.0**3 / 6 / v_atom  # 160.2 atoms
    best = shells[np.argmin(np.abs(cum - target))]
    expect_n = int(np.sum(m2 <= best))
    expect_pb = int(np.sum((m2 <= best) & ((i + j + k) % 2 == 0)))
    assert (best, expect_n, expect_pb) == (11, 171, 79)  # shells up to m = 11; the m = 11 shell is S

    c = cluster.cut(crystal.pbs(), "sphere", 2.0)
    assert c.n_atoms == expect_n
    assert c.counts() == {"Pb": expect_pb, "S": expect_n - expect_pb}
    assert np.min(np.linalg.norm(c.positions_angstrom[c.elements == "Pb"], axis=1)) < 1e-12  # a Pb at the centre
    assert np.max(np.linalg.norm(c.positions_angstrom, axis=1)) == pytest.approx(np.sqrt(11) * a / 2, abs=1e-9)
    d = (6 * 171 * v_atom / np.pi) ** (1 / 3) / 10
    assert c.diameter_nm == pytest.approx(d, rel=1e-12)
    assert d == pytest.approx(2.0439, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# CIF import
# ---------------------------------------------------------------------------------------------------------------
PBS_CIF = """data_PbS
_symmetry_space_group_name_H-M 'F m -3 m'
_space_group_IT_number 225
_cell_length_a 5.936
_cell_length_b 5.936
_cell_length_c 5.936
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
loop_
_space_group_symop_operation_xyz
{ops}
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Pb1 Pb 0 0 0 1
S1 S 0.5 0.5 0.5 1
"""


def _fm3m_ops():
    import gemmi

    return "\n".join(f"'{op.triplet()}'" for op in gemmi.SpaceGroup("F m -3 m").operations())


def _write_cif(tmp_path, name, anion_first=False):
    atoms = ["Pb1 Pb 0 0 0 1", "S1 S 0.5 0.5 0.5 1"]
    text = PBS_CIF.format(ops=_fm3m_ops()).replace("\n".join(atoms), "\n".join(atoms[::-1] if anion_first else atoms))
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cif_import_reproduces_the_builtin_pbs(tmp_path):
    cif = crystal.from_cif(_write_cif(tmp_path, "pbs.cif"))
    ref = crystal.pbs()
    assert len(cif.site_elements) == 8 and sorted(cif.site_elements) == sorted(ref.site_elements)
    assert np.allclose(cif.lattice_angstrom, ref.lattice_angstrom, atol=1e-12)
    assert cif.volume_per_atom_angstrom3 == pytest.approx(ref.volume_per_atom_angstrom3, rel=1e-12)
    kw = dict(b_iso={"Pb": 0.9, "S": 1.4}, energy_kev=17.48)
    for shape in ("sphere", "cuboctahedron"):
        a = cluster.cut(cif, shape, 3.0)
        b = cluster.cut(ref, shape, 3.0)
        assert a.counts() == b.counts()
        assert _rel(_lattice(a, **kw), _lattice(b, **kw)) <= 1e-12
    # surfaces remove atoms at random (seeded), so only the composition is comparable across site orders
    for surface in ("stoichiometric", "cation_rich"):
        assert (cluster.cut(cif, "sphere", 3.0, surface=surface, seed=2).counts()
                == cluster.cut(ref, "sphere", 3.0, surface=surface, seed=2).counts())


def test_cif_atom_order_does_not_decide_which_element_is_the_cation(tmp_path):
    """The same PbS CIF with S listed first must still cut Pb-centred particles and cation_rich must remove S."""
    cif = crystal.from_cif(_write_cif(tmp_path, "spb.cif", anion_first=True))
    ref = crystal.pbs()
    assert cluster.cut(cif, "sphere", 2.0).counts() == cluster.cut(ref, "sphere", 2.0).counts()  # Pb 79, S 92
    rich = cluster.cut(cif, "sphere", 2.0, surface="cation_rich", seed=2).counts()
    assert rich == cluster.cut(ref, "sphere", 2.0, surface="cation_rich", seed=2).counts()
    assert rich["Pb"] > rich["S"]
