"""`qdsize pattern`: the file contract, and one clear error line (no traceback) for every kind of bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdsize.sim import cluster, crystal, debye, io

REPO = Path(__file__).resolve().parents[1]


def qdsize(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qdsize.platform", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_import_platform_from_the_repo_root_loads_the_standard_library():
    out = subprocess.run([sys.executable, "-c", "import platform, sys; print(platform.__file__); "
                          "print(platform.python_version())"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.splitlines()[0]).resolve()
    assert REPO not in path.parents, f"the repo's platform/ folder shadows the standard library: {path}"
    assert not (REPO / "platform" / "__init__.py").exists()
    assert out.stdout.splitlines()[1].startswith("3.")


def test_pattern_writes_two_columns_with_a_full_header(tmp_path):
    out = tmp_path / "p.xy"
    png = tmp_path / "p.png"
    r = qdsize("pattern", "--material", "pbs", "--shape", "cuboctahedron", "--diameter-nm", "3",
               "--q-min", "1", "--q-max", "8", "--q-step", "0.01", "--b-iso", "Pb=1.2,S=0.8",
               "--energy-kev", "17.48", "-o", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    data = np.loadtxt(out)
    assert data.shape == (701, 2)
    np.testing.assert_allclose(data[:, 0], np.arange(701) * 0.01 + 1.0, atol=1e-9)
    head = io.read_pattern_header(out)
    for key in ("material", "shape", "mean_diameter_nm", "b_iso", "energy_kev", "atom_counts", "q_step"):
        assert key in head
    assert head["b_iso"] == {"Pb": 1.2, "S": 0.8} and head["energy_kev"] == 17.48
    assert png.stat().st_size > 10_000
    # the numbers are the DSE of the same cluster
    c = cluster.cut(crystal.pbs(), "cuboctahedron", 3.0)
    assert sum(head["atom_counts"].values()) == c.n_atoms
    ref = debye.intensity(debye.lattice_statistics(c), data[:, 0], b_iso={"Pb": 1.2, "S": 0.8}, energy_kev=17.48)[0]
    np.testing.assert_allclose(data[:, 1], ref, rtol=1e-9)


def test_pattern_from_xyz_uses_the_atomistic_engine(tmp_path):
    c = cluster.cut(crystal.pbs(), "sphere", 2.0)
    xyz = tmp_path / "c.xyz"
    io.write_xyz(xyz, c, "PbS 2 nm")
    out = tmp_path / "x.xy"
    r = qdsize("pattern", "--xyz", xyz, "--q-min", "1", "--q-max", "10", "-o", out)
    assert r.returncode == 0, r.stderr
    data = np.loadtxt(out)
    ref = debye.intensity(debye.lattice_statistics(c), data[:, 0])[0]
    np.testing.assert_allclose(data[:, 1], ref, rtol=1e-4)
    assert io.read_pattern_header(out)["engine"] == "atomistic"


def test_polydisperse_pattern_reports_realised_labels(tmp_path):
    out = tmp_path / "poly.xy"
    r = qdsize("pattern", "--diameter-nm", "3", "--dispersion-pct", "10", "-o", out)
    assert r.returncode == 0, r.stderr
    head = io.read_pattern_header(out)
    assert head["mean_diameter_nm"] == pytest.approx(3.0, abs=0.01)
    assert head["size_dispersion_pct"] == pytest.approx(10.0, abs=0.5)


BAD_XYZ = {
    "unknown_element.xyz": ("2\nc\nXx 0 0 0\nPb 0 0 3\n", "element"),
    "short.xyz": ("5\nc\nPb 0 0 0\n", "header says 5 atoms"),
    "count.xyz": ("two\nc\nPb 0 0 0\n", "number of atoms"),
    "coords.xyz": ("1\nc\nPb 0 zero 0\n", "Element x y z"),
}


@pytest.mark.parametrize("args, field", [
    (["--diameter-nm", "-3"], "diameter_nm"),
    (["--diameter-nm", "0"], "diameter_nm"),
    (["--diameter-nm", "4", "--dispersion-pct", "120"], "size_dispersion_pct"),
    (["--diameter-nm", "4", "--dispersion-pct", "-1"], "size_dispersion_pct"),
    (["--diameter-nm", "4", "--shape", "blob"], "shape"),
    (["--diameter-nm", "4", "--material", "unobtainium"], "material"),
    (["--diameter-nm", "4", "--surface", "oily"], "surface"),
    (["--diameter-nm", "4", "--q-min", "5", "--q-max", "2"], "q_max"),
    (["--diameter-nm", "4", "--q-step", "0"], "q_step"),
    (["--diameter-nm", "4", "--b-iso", "Pb=x"], "--b-iso"),
    (["--diameter-nm", "4", "--b-iso", "-1"], "b_iso"),
    (["--diameter-nm", "4", "--energy-kev", "-8"], "energy_kev"),
    (["--diameter-nm", "4", "--b-iso", "Pb=1,Xq=2"], "element"),
    ([], "--diameter-nm"),
    (["--xyz", "missing.xyz"], "file not found"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, field):
    r = qdsize("pattern", *args, "-o", tmp_path / "o.xy", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert not (tmp_path / "o.xy").exists()


@pytest.mark.parametrize("name", sorted(BAD_XYZ))
def test_malformed_xyz_gives_one_clear_line(tmp_path, name):
    text, expected = BAD_XYZ[name]
    (tmp_path / name).write_text(text)
    r = qdsize("pattern", "--xyz", tmp_path / name, "-o", tmp_path / "o.xy")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0] and name in lines[0], r.stderr
