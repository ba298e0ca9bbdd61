"""Agreement with DebyeCalculator 1.1.1, the peer implementation of the Debye scattering equation.

DebyeCalculator returns half the conventional DSE (it sums i < j and adds half of the self term) and damps every
pair with exp(-B Q^2 / (8 pi^2)) for one B, which is our T_s T_t for a common B (T = exp(-B Q^2 / (16 pi^2))).
So 2 x DebyeCalculator = our intensity. It runs here on the CPU in float64 from an xyz file written by qdsize.
"""

import numpy as np
import pytest

from qdsize.sim import cluster, crystal, debye, io, scattering

try:
    import torch
    from debyecalculator import DebyeCalculator
except ImportError as exc:  # optional dev dependency (pyproject [dev]): skip, saying why
    pytest.skip(f"debyecalculator cannot be imported ({exc}); install the dev extra to run the peer comparison",
                allow_module_level=True)

TOL = 1e-3


def _peer(xyz_path, b_iso=0.0, include_self_scattering=True):
    calc = DebyeCalculator(qmin=0.5, qmax=12.0, qstep=0.01, biso=b_iso, device="cpu", dtype=torch.float64,
                           num_threads=2)
    q, i_q = calc.iq(str(xyz_path), include_self_scattering=include_self_scattering)
    return np.asarray(q, dtype=np.float64), np.asarray(i_q, dtype=np.float64)


def _rel(a, ref):
    return float(np.max(np.abs(a - ref) / np.abs(ref)))


@pytest.fixture(scope="module")
def pbs_4nm(tmp_path_factory):
    c = cluster.cut(crystal.pbs(), "sphere", 4.0)
    assert 1200 < c.n_atoms < 1400  # about 20 D^3 atoms
    path = tmp_path_factory.mktemp("peer") / "pbs_4nm.xyz"
    io.write_xyz(path, c, comment="PbS 4 nm sphere, Pb-centred, as cut")
    return c, path


def test_pbs_4nm_sphere_matches_debyecalculator(pbs_4nm):
    c, path = pbs_4nm
    q, half = _peer(path, b_iso=0.0)
    assert q.size == 1150 and q[0] == pytest.approx(0.5) and q[-1] == pytest.approx(11.99, abs=1e-5)
    ours = debye.intensity(debye.lattice_statistics(c), q)[0]
    assert _rel(2.0 * half, ours) <= TOL
    # the same file read back through qdsize's xyz reader and the atomistic engine
    back = io.read_xyz(path)
    assert back.n_atoms == c.n_atoms
    assert _rel(2.0 * half, debye.intensity(debye.atomistic_statistics(back), q)[0]) <= TOL


def test_debye_waller_and_self_term_conventions(pbs_4nm):
    c, path = pbs_4nm
    b = 0.8
    q, half = _peer(path, b_iso=b)
    ours = debye.intensity(debye.lattice_statistics(c), q, b_iso=b)[0]  # one B for both elements
    assert _rel(2.0 * half, ours) <= TOL
    # DebyeCalculator's self term is half of sum_i f_i^2 and undamped, as ours (to 7e-8: it rounds the
    # Waasmaier-Kirfel coefficients to float32 before casting them to float64)
    _, half_pairs = _peer(path, b_iso=b, include_self_scattering=False)
    f = scattering.form_factors(("Pb", "S"), q).real
    counts = c.counts()
    self_term = counts["Pb"] * f[0] ** 2 + counts["S"] * f[1] ** 2
    assert _rel(2.0 * (half - half_pairs), self_term) <= 1e-6
    # and a wrong convention would be caught: B applied per element amplitude twice (T_s^2 T_t^2) is far off
    wrong = debye.intensity(debye.lattice_statistics(c), q, b_iso=2 * b)[0]
    assert _rel(2.0 * half, wrong) > 10 * TOL


def test_cdse_cation_rich_octahedron_matches_debyecalculator(tmp_path):
    c = cluster.cut(crystal.cdse(), "truncated_octahedron", 3.0, surface="cation_rich", centre="random", seed=4)
    counts = c.counts()
    assert counts["Cd"] > counts["Se"]
    path = tmp_path / "cdse.xyz"
    io.write_xyz(path, c)
    q, half = _peer(path, b_iso=0.5)
    ours = debye.intensity(debye.lattice_statistics(c), q, b_iso=0.5)[0]
    assert _rel(2.0 * half, ours) <= TOL
