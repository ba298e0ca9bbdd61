"""The layering the README promises: physics in qdsize.sim without the platform, one contract for shared names,
presets shipped as package data, and command modules that import in one direction."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("qdsize.platform", "ray", "mlflow", "optuna")


def loaded_after_import(module: str) -> list[str]:
    """Top-level packages (and qdsize layers) a fresh interpreter holds after importing `module`."""
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted({n if n.startswith('qdsize.') else n.split('.')[0] for n in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


PHYSICS = ["qdsize.sim.ladder", "qdsize.sim.compose", "qdsize.sim.distribution", "qdsize.sim.contract",
           "qdsize.sim.pattern", "qdsize.sim.measured", "qdsize.sim.calibrant", "qdsize.sim.debye",
           "qdsize.sim.refine"]
LEARNING = ["qdsize.ml.data", "qdsize.ml.train", "qdsize.ml.predict", "qdsize.ml.evaluate", "qdsize.ml.shards"]


def test_physics_modules_load_no_platform_ray_mlflow_or_torch():
    held = loaded_after_import(", ".join(PHYSICS))  # all of them together hold none, so none of them does
    assert not [m for m in held if m.startswith(HEAVY) or m == "torch"], held


def test_learning_modules_load_no_platform_or_ray():
    held = loaded_after_import(", ".join(LEARNING))
    assert not [m for m in held if m.startswith("qdsize.platform") or m == "ray"], held


def test_no_two_classes_share_a_name():
    seen = {}
    for folder in ("sim", "ml", "platform"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    seen.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_the_augmentation_loads_torch_but_no_platform():
    held = loaded_after_import("qdsize.sim.augment")
    assert "torch" in held and not [m for m in held if m.startswith(HEAVY)], held


def test_shared_names_are_defined_once_in_the_contract():
    """REGISTERED_MODEL, SPLITS, FROZEN_SPLITS, LABEL_COLUMNS, RESOLUTION_KEYS: assigned in sim/contract.py only."""
    names = {"REGISTERED_MODEL", "SPLITS", "FROZEN_SPLITS", "LABEL_COLUMNS", "RESOLUTION_KEYS"}
    where = {}
    for folder in ("sim", "ml", "platform"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name) and t.id in names:
                            where.setdefault(t.id, []).append(str(path.relative_to(ROOT)))
    assert where == {n: ["sim/contract.py"] for n in names}, where
    from qdsize.ml import model, predict
    from qdsize.platform import config, dataset, tracking
    from qdsize.sim import calibrant, contract

    assert tracking.REGISTERED_MODEL is contract.REGISTERED_MODEL and config.FROZEN_SPLITS is contract.FROZEN_SPLITS
    assert dataset.LABEL_COLUMNS is contract.LABEL_COLUMNS and predict.RESOLUTION_KEYS is contract.RESOLUTION_KEYS
    assert not hasattr(model, "RESOLUTION_KEYS") or model.RESOLUTION_KEYS is contract.RESOLUTION_KEYS
    fit = calibrant.ResolutionFit("Si", 0.02, 0.002, 0.1, 0.0, 0.0, 0.0)
    assert fit.resolution == contract.Resolution.parse("0.02,0.002,0.1") and fit.argument == "0.02,0.002,0.1"
    assert predict.check_resolution("0.02,0.002") == (0.02, 0.002, 0.0)
    with pytest.raises(contract.InputError, match="resolution fwhm0_inv_angstrom = 0.9"):
        contract.Resolution.parse([0.9, 0.001])


def test_augmentation_presets_are_package_data():
    from qdsize.sim import augment

    assert augment.PRESETS_DIR.parent == Path(augment.__file__).parent  # inside the package, not the checkout
    assert {p.stem for p in augment.PRESETS_DIR.glob("*.yaml")} >= {"default", "realistic"}
    toml = (ROOT / "pyproject.toml").read_text()
    assert '"presets/*.yaml"' in toml


def test_one_lognormal_weights_implementation():
    """The dataset composer's batch weights and the single-pattern weights are one function."""
    from qdsize.platform import simulate
    from qdsize.sim import distribution

    assert simulate.ladder_weights_batch is distribution.ladder_weights_batch
    src = (ROOT / "sim" / "distribution.py").read_text()
    assert src.count("ndtr(") == 2  # the two integrals, once


def test_frozen_instrument_is_data_in_the_manifest(tiny_dataset):
    from qdsize.ml import data

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert manifest["frozen_instrument"] == {"fwhm0_inv_angstrom": 0.02, "fwhm_relative": 0.002,
                                             "lorentz_fraction": 0.0}
    assert list(data.instrument_of(tiny_dataset)) == pytest.approx([0.02, 0.002, 0.0])


def test_command_modules_import_the_app_not_each_other():
    """cli.py gathers the command modules; they take the app from cli_app.py, so no module imports in a circle."""
    for name in ("cli_ml.py", "cli_model.py", "cli_refine.py"):
        tree = ast.parse((ROOT / "platform" / name).read_text())
        top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [n.module for n in top if n.module == "qdsize.platform.cli"], name
        assert any(n.module == "qdsize.platform.cli_app" for n in top), name


def test_the_readme_library_example_runs():
    """The README's Python example: the library path from files to answers, as the CLI takes it."""
    import re

    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("examples/pbs_A_toluene.xy 3.")
    assert all(float(ln.split()[1]) > 2 for ln in lines)
