"""The material check: the simulator's PbS under augmentation passes; solvent, capillary, noise and CdSe do not."""

import numpy as np
import pytest
import torch

from qdsize.ml.ood import PhysicsCheck
from qdsize.sim import augment, pattern, solvents

Q = np.arange(1.0, 8.0001, 0.01)


@pytest.fixture(scope="module")
def check():
    sizes = np.linspace(2.0, 8.0, 12)
    clean = np.array([pattern.simulate(Q, diameter_nm=d, b_iso=1.0).intensity for d in sizes])
    # the training ranges stretch solvents along Q: the check's background spans the same stretched liquids
    dilation = augment.config_from({"preset": "default"}).solvent.dilation
    chk = PhysicsCheck.build(Q, clean, sizes, np.zeros_like(sizes), solvent_dilation=dilation)
    pbs = _pbs([(3, 8, "sphere"), (5, 12, "cuboctahedron"), (6.5, 5, "cube"), (4, 20, "sphere")], b_iso=1.5)
    aug = augment.from_config({"preset": "default"}, Q)
    gen = torch.Generator().manual_seed(0)
    chk.fit_threshold(np.concatenate([aug(torch.as_tensor(pbs), gen).numpy() for _ in range(100)]))
    return chk


def _pbs(specs, b_iso=1.0, material="pbs"):
    return np.array([pattern.simulate(Q, material=material, diameter_nm=d, size_dispersion_pct=s, shape=shape,
                                      b_iso=b_iso).intensity for d, s, shape in specs], dtype=np.float32)


def test_augmented_pbs_it_never_saw_passes(check):
    pbs = _pbs([(3.5, 10, "cube"), (5.5, 6, "sphere"), (7, 15, "cuboctahedron")], b_iso=0.8)
    gen = torch.Generator().manual_seed(123)  # other draws than the threshold saw
    for preset, allowed in (("default", 0.03), ("realistic", 0.0)):
        aug = augment.from_config({"preset": preset}, Q)
        x = np.concatenate([aug(torch.as_tensor(pbs), gen).numpy() for _ in range(40)])
        evidence, flagged = check.flags(x)
        assert flagged.mean() <= allowed, (preset, flagged.mean())
    evidence, flagged = check.flags(pbs)
    assert not flagged.any() and evidence.min() > 0.95


def test_what_is_not_pbs_dots_is_flagged(check):
    rng = np.random.default_rng(1)
    tol, kapton = solvents.solvent_intensity("toluene", Q), solvents.capillary_intensity("kapton", Q)
    glass = solvents.capillary_intensity("borosilicate", Q)
    cdse = _pbs([(3, 10, "sphere"), (5, 10, "sphere"), (7, 5, "cube")], material="cdse")
    others = {
        "pure toluene": tol,
        "toluene with counting noise": rng.poisson(500 * tol / tol.max()).astype(float),
        "toluene off our model": np.interp(Q * 1.03, Q, tol) + 0.1 * Q,
        "empty kapton capillary": rng.poisson(800 * kapton / kapton.max()).astype(float),
        "empty glass capillary": glass,
        "noise": rng.poisson(50.0, len(Q)).astype(float),
        **{f"CdSe {i}": c for i, c in enumerate(cdse)},
    }
    evidence, flagged = check.flags(np.array(list(others.values())))
    missed = [name for name, f in zip(others, flagged) if not f]
    assert not missed, dict(zip(others, evidence.round(3)))


def test_partial_coverage_and_round_trip(check, tmp_path):
    pbs = _pbs([(4.5, 10, "sphere")])
    mask = ((Q > 1.5) & (Q < 6.0)).astype(np.float32)[None]
    evidence, flagged = check.flags(pbs, mask)
    assert evidence[0] > 0.9 and not flagged[0]
    assert check.flags(pbs, np.zeros_like(mask))[0][0] == 0.0  # nothing measured: no evidence
    check.save(tmp_path)
    again = PhysicsCheck.load(tmp_path)
    np.testing.assert_allclose(again.flags(pbs, mask)[0], evidence, rtol=1e-5)
    assert PhysicsCheck.load(tmp_path / "elsewhere") is None


def test_a_liquid_stretched_as_training_stretches_them_is_background_not_missing_structure(check):
    """PbS under a solvent stretched along Q (a liquid we do not tabulate) is still explained by the check that
    knows the training's stretch range; one that knows only the tabulated liquids explains less of it."""
    pbs = _pbs([(4.0, 8, "sphere")])[0].astype(float)
    dq = np.gradient(Q)
    liquid = solvents.solvent_intensity("hexane", Q / 1.6)
    x = pbs + 2.0 * liquid / np.sum(liquid * dq) * np.sum(pbs * dq)
    sizes = np.linspace(2.0, 8.0, 12)
    clean = np.array([pattern.simulate(Q, diameter_nm=d, b_iso=1.0).intensity for d in sizes])
    plain = PhysicsCheck.build(Q, clean, sizes, np.zeros_like(sizes))
    assert check.background.shape[0] == plain.background.shape[0] + 2 * len(solvents.SOLVENTS)
    stretched_ev, flagged = check.flags(x[None])
    plain_ev, _ = plain.evidence(x[None])
    assert not flagged[0] and stretched_ev[0] > 0.9 and stretched_ev[0] > plain_ev[0] + 0.05, (stretched_ev, plain_ev)
