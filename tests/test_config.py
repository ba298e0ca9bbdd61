"""Config loading: overrides, validation errors that name the field, unknown keys, resolution and hashing."""

import subprocess
import sys
from pathlib import Path

import pytest

from qdsize.platform import config as cf
from qdsize.sim.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "dataset" / "smoke.yaml"
PBS = REPO / "conf" / "dataset" / "pbs.yaml"


def test_default_configs_load_and_resolve_every_key():
    full = cf.load_dataset_config(PBS)
    d = full.config.dataset
    assert d.sizes.edges_nm == [float(x) for x in range(2, 13)]
    assert d.dispersion.class_edges_pct == [0, 5, 10, 15, 25]
    assert d.seedgrid.means_nm[0] == 2.0 and d.seedgrid.means_nm[-1] == 10.0 and len(d.seedgrid.means_nm) == 17
    assert set(d.variants.shapes) == {"sphere", "cuboctahedron", "truncated_octahedron", "cube"}
    assert d.variants.training_shapes == ["octahedron"]
    assert full.resolved["dataset"]["q"] == {"min_inv_angstrom": 1.0, "max_inv_angstrom": 10.0,
                                             "step_inv_angstrom": 0.005}
    # the default file spells out the defaults: same resolved config, same hash as the bare schema
    assert full.hash == cf.load(cf.DatasetFile, data={"dataset": {}}).hash
    smoke = cf.load_dataset_config(SMOKE)
    assert smoke.hash != full.hash and len(smoke.hash) == 16


def test_overrides_are_yaml_scalars_and_change_the_hash():
    base = cf.load_dataset_config(SMOKE)
    o = cf.load_dataset_config(SMOKE, ["dataset.samples=123", "dataset.variants.shapes=[cube]",
                                       "dataset.nuisance.b_iso_angstrom2.Pb=[0.5, 1.0]"])
    assert o.config.dataset.samples == 123
    assert o.config.dataset.variants.shapes == ["cube"]
    assert o.config.dataset.nuisance.b_iso_angstrom2["Pb"] == [0.5, 1.0]
    assert o.hash != base.hash
    again = cf.load_dataset_config(SMOKE, ["dataset.samples=123", "dataset.variants.shapes=[cube]",
                                           "dataset.nuisance.b_iso_angstrom2.Pb=[0.5, 1.0]"])
    assert again.hash == o.hash and again.resolved == o.resolved


@pytest.mark.parametrize("override, field, expected", [
    ("dataset.sizes.max_nm=-3", "dataset.sizes.max_nm = -3.0", "expected a diameter in nm above"),
    ("dataset.samples=abc", "dataset.samples = 'abc'", "expected an integer"),
    ("dataset.samples=1.5", "dataset.samples = 1.5", "expected an integer"),
    ("dataset.sizes.maxnm=3", "dataset.sizes.maxnm = 3", "no such key here"),
    ("dataset.variants.shapes=[sphere, blob]", "dataset.variants.shapes[1] = 'blob'", "expected one of"),
    ("dataset.variants.shapes=[polyhedron:0.4]", "dataset.variants.shapes[0] = 'polyhedron:0.4'", "RHO >= 0.577"),
    ("dataset.variants.shapes=[polyhedron:x]", "dataset.variants.shapes[0] = 'polyhedron:x'", "polyhedron:RHO"),
    ("dataset.variants.shapes=[polyhedron]", "dataset.variants.shapes[0] = 'polyhedron'", "polyhedron:RHO"),
    ("dataset.variants.training_shapes=[cube]", "dataset.variants.training_shapes = ['cube']", "not already in"),
    ("dataset.variants.training_shapes=[blob]", "dataset.variants.training_shapes[0] = 'blob'", "expected one of"),
    ("dataset.splits.train=0.9", "dataset.splits = ", "fractions that sum to 1"),
    ("dataset.ladder.max_nm=5", "dataset.ladder.max_nm = 5.0", "the largest mean"),
    ("dataset.nuisance.microstrain_pct=[0.5, 0.1]", "dataset.nuisance.microstrain_pct = [0.5, 0.1]",
     "[low, high]"),
    ("dataset.q.step_inv_angstrom=0", "dataset.q.step_inv_angstrom = 0.0", "a positive number"),
    ("dataset.nuisance.b_iso_angstrom2={Pb: [0.3, 3]}", "dataset.nuisance.b_iso_angstrom2", "per element"),
    ("dataset=3", "dataset = 3", "a mapping"),
    ("datset.samples=3", "datset = ", "no such key here"),
])
def test_bad_values_name_the_field_the_value_and_what_was_expected(override, field, expected):
    with pytest.raises(InputError) as ei:
        cf.load_dataset_config(PBS, [override])
    msg = str(ei.value)
    assert msg.startswith(field), msg
    assert expected in msg, msg


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(InputError, match="config = .*expected an existing YAML file"):
        cf.load_dataset_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        cf.load_dataset_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(InputError, match="a YAML mapping at the top level"):
        cf.load_dataset_config(bad)
    with pytest.raises(InputError, match="override = 'samples': expected key=value"):
        cf.load_dataset_config(SMOKE, ["samples"])


def test_content_hash_is_canonical():
    assert cf.content_hash({"a": 1, "b": [1, 2]}) == cf.content_hash({"b": [1, 2], "a": 1})
    assert cf.content_hash({"a": 1}) != cf.content_hash({"a": 2})


def test_cli_invalid_config_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "ds"
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "simulate", str(SMOKE), "dataset.sizes.max_nm=-3",
                        "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**__import__("os").environ, "QDSIZE_HOME": str(home)})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("qdsize: error: dataset.sizes.max_nm = -3.0: expected"), \
        r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not home.exists()
    assert list(tmp_path.iterdir()) == []
