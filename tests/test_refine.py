"""Refinement physics: recovery of size and dispersion, honest uncertainties, stability, improvement, clear errors."""

import json

import numpy as np
import pytest

from qdsize.sim import debye, pattern, refine as rf, scattering, solvents
from qdsize.sim.errors import InputError

WAVELENGTH_A = 0.5594  # Ag K-alpha
ENERGY_KEV = scattering.energy_kev(WAVELENGTH_A)
TWO_THETA = np.linspace(5.2, 52.0, 1801)  # a laboratory 2-theta scan: Q = 1.02-9.88 1/A, non-uniform in Q
Q = scattering.q_from_two_theta(TWO_THETA, WAVELENGTH_A)
SMALL_LADDER = {"ladder_max_nm": 14.0}  # the default ladder's steps, ending at 14 nm (fast to build)
B_TRUE = {"Pb": 1.4, "S": 0.9}
STRAIN_TRUE = 0.003


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("QDSIZE_HOME", str(tmp_path_factory.mktemp("refine_home")))
    mp.setitem(rf.DEFAULT_LADDER, "ladder_max_nm", SMALL_LADDER["ladder_max_nm"])
    yield
    mp.undo()


@pytest.fixture(scope="module")
def ladder(home):
    return rf.load_ladder(float(Q[0]), float(Q[-1]), spec=SMALL_LADDER)


@pytest.fixture(scope="module")
def family_stats(ladder):
    from qdsize.platform import simulate as psim

    return debye.PairStatistics.load(psim.cache_dir() / "families" / f"{ladder.spec['family_id']}.npz")


def observe(i_per_atom, rng, max_counts=2e4, solvent_ratio=0.0, bg_fraction=0.25):
    """Counts: particle + smooth polynomial background (+ toluene), Poisson at `max_counts` for the top point."""
    x = 2.0 * (Q - Q[0]) / (Q[-1] - Q[0]) - 1.0
    total = i_per_atom + bg_fraction * i_per_atom.mean() * (1.0 + 0.4 * x - 0.2 * x**2)
    if solvent_ratio:
        s = solvents.solvent_intensity("toluene", Q)
        total = total + solvent_ratio * i_per_atom.mean() * s / s.mean()
    return rng.poisson(total * max_counts / total.max()).astype(np.float64)


def per_atom(pat):
    return pat.intensity / pat.params["mean_atoms_per_particle"]


def test_model_equals_exact_dse_of_the_ladder(ladder, family_stats):
    """The fast model (fine-grid B-splines, weighted sum) is the exact DSE of the same mixture to 1e-5."""
    exact = per_atom(pattern.compose(family_stats, Q, 6.0, 12.0, strain=STRAIN_TRUE, b_iso=B_TRUE,
                                     energy_kev=ENERGY_KEV))
    ff = scattering.form_factors(ladder.species, Q, ENERGY_KEV)
    prob = rf.Problem(Q, exact, np.ones_like(Q), "file", ladder, np.abs(ff) ** 2,
                      np.array([2 * np.real(ff[s] * np.conj(ff[t])) for s, t in ladder.pairs]), np.ones((1, Q.size)),
                      ["c"], ["mean_diameter_nm", "size_dispersion_pct", "strain", "b_iso_Pb", "b_iso_S"])
    fast = rf.dse_per_atom(prob, np.array([[6.0, 12.0, STRAIN_TRUE, B_TRUE["Pb"], B_TRUE["S"]]]))[0]
    assert np.max(np.abs(fast - exact)) < 1e-5 * exact.max()


@pytest.mark.parametrize("mean_nm, disp_pct, seed", [(4.0, 8.0, 3), (7.0, 15.0, 4)])
def test_recovers_size_and_dispersion_of_an_independent_simulation(ladder, mean_nm, disp_pct, seed):
    """A pattern simulated on its own fine ladder (other cut centre), with a polynomial background, toluene and
    Poisson noise: refined within 0.1 nm and 2 points, from starts 0.5 nm and 5 points off on either side, and
    the two starts agree within their uncertainties."""
    pat = pattern.simulate(Q, shape="sphere", diameter_nm=mean_nm, size_dispersion_pct=disp_pct, surface="cation_rich",
                           centre="random", seed=seed + 10, strain=STRAIN_TRUE, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    true_m, true_c = pat.params["mean_diameter_nm"], pat.params["size_dispersion_pct"]
    y = observe(per_atom(pat), np.random.default_rng(seed), solvent_ratio=0.5)
    fits = []
    for dm, dc in ((0.5, 5.0), (-0.5, -5.0)):
        r = rf.refine(Q, y, {"mean_diameter_nm": mean_nm + dm, "size_dispersion_pct": max(disp_pct + dc, 0.0)},
                      energy_kev=ENERGY_KEV, ladder=ladder, solvent=["toluene"], resolution="none").refined
        assert abs(r["mean_diameter_nm"] - true_m) < 0.1
        assert abs(r["size_dispersion_pct"] - true_c) < 2.0
        assert abs(r["lattice_parameter_angstrom"] - 5.936 * (1 + STRAIN_TRUE)) < 0.002
        assert abs(r["b_iso"]["Pb"] - B_TRUE["Pb"]) < 0.15
        assert r["reduced_chi2"] < 1.5 and "poor_fit" not in r["flags"]
        assert r["weighting"] == "poisson" and r["background"]["solvent_toluene"] > 0
        fits.append(r)
    a, b = fits
    for key, std in (("mean_diameter_nm", "mean_diameter_std_nm"), ("size_dispersion_pct", "size_dispersion_std_pct")):
        assert abs(a[key] - b[key]) <= max(a[std], b[std]) + 1e-9


def test_uncertainties_cover_the_truth_and_match_the_scatter(ladder, family_stats):
    """Over noisy repeats of a pattern the model describes exactly, the 2-sigma intervals of size and dispersion
    cover the truth in >= 70 % of cases, and the reported sigma matches the scatter of the estimates."""
    pat = pattern.compose(family_stats, Q, 5.0, 10.0, strain=STRAIN_TRUE, microstrain_pct=0.2, b_iso=B_TRUE,
                          energy_kev=ENERGY_KEV)
    truth = np.array([pat.params["mean_diameter_nm"], pat.params["size_dispersion_pct"]])
    i_atom = per_atom(pat)
    est, std = [], []
    for seed in range(10):
        r = rf.refine(Q, observe(i_atom, np.random.default_rng(100 + seed), max_counts=1e4),
                      {"mean_diameter_nm": 5.4, "size_dispersion_pct": 14.0}, energy_kev=ENERGY_KEV,
                      ladder=ladder).refined
        est.append([r["mean_diameter_nm"], r["size_dispersion_pct"]])
        std.append([r["mean_diameter_std_nm"], r["size_dispersion_std_pct"]])
    est, std = np.array(est), np.array(std)
    coverage = np.mean(np.abs(est - truth) <= 2 * std, axis=0)
    assert np.all(coverage >= 0.7), coverage
    ratio = est.std(axis=0, ddof=1) / std.mean(axis=0)
    assert np.all((ratio > 0.4) & (ratio < 2.0)), ratio


def test_improves_on_perturbed_starts(ladder, family_stats):
    """Starts 0.5 nm and 5 points off in every direction: refined errors are far smaller than the starts'."""
    pat = pattern.compose(family_stats, Q, 6.5, 12.0, strain=-0.002, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    truth = np.array([pat.params["mean_diameter_nm"], pat.params["size_dispersion_pct"]])
    y = observe(per_atom(pat), np.random.default_rng(7))
    start_err, fit_err = [], []
    for dm in (-0.5, 0.5):
        for dc in (-5.0, 5.0):
            s = np.array([6.5 + dm, 12.0 + dc])
            r = rf.refine(Q, y, {"mean_diameter_nm": s[0], "size_dispersion_pct": s[1]}, energy_kev=ENERGY_KEV,
                          ladder=ladder).refined
            start_err.append(np.abs(s - truth))
            fit_err.append(np.abs([r["mean_diameter_nm"], r["size_dispersion_pct"]] - truth))
    start_err, fit_err = np.mean(start_err, axis=0), np.mean(fit_err, axis=0)
    assert np.all(fit_err < 0.2 * start_err), (fit_err, start_err)


def test_robust_weights_for_non_count_data(ladder, family_stats):
    """Scaled, non-integer data without sigma: the noise estimated from the data gives a reduced chi-square near
    1, and uncertainties comparable to those from the true Poisson weights."""
    pat = pattern.compose(family_stats, Q, 4.5, 9.0, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    y = observe(per_atom(pat), np.random.default_rng(11))
    start = {"mean_diameter_nm": 4.8, "size_dispersion_pct": 12.0}
    counts = rf.refine(Q, y, start, energy_kev=ENERGY_KEV, ladder=ladder).refined
    scaled = rf.refine(Q, y * 0.0137, start, energy_kev=ENERGY_KEV, ladder=ladder).refined
    assert counts["weighting"] == "poisson" and scaled["weighting"] == "robust"
    assert 0.7 < scaled["reduced_chi2"] < 1.4
    assert abs(scaled["mean_diameter_nm"] - counts["mean_diameter_nm"]) < 2 * counts["mean_diameter_std_nm"]
    assert 0.6 < scaled["mean_diameter_std_nm"] / counts["mean_diameter_std_nm"] < 1.6


def test_flags_a_poor_fit_and_a_singular_covariance(ladder, family_stats):
    """Unmodelled solvent scattering at high counts makes a poor fit; two identical background terms make the
    covariance singular: both flagged with a message, uncertainties undetermined (None), never an exception."""
    pat = pattern.compose(family_stats, Q, 5.0, 10.0, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    y = observe(per_atom(pat), np.random.default_rng(5), max_counts=1e5, solvent_ratio=2.0)
    start = {"mean_diameter_nm": 5.0, "size_dispersion_pct": 10.0}
    kw = dict(energy_kev=ENERGY_KEV, ladder=ladder, refine_microstrain=False)  # none in the data; faster
    poor = rf.refine(Q, y, start, background="legendre", background_degree=1, **kw).refined
    assert "poor_fit" in poor["flags"] and poor["reduced_chi2"] > 3
    good = rf.refine(Q, y, start, solvent=["toluene"], **kw).refined
    assert "poor_fit" not in good["flags"] and good["reduced_chi2"] < 1.5
    sing = rf.refine(Q, y, start, solvent=["toluene", "toluene"], **kw).refined
    assert "singular_covariance" in sing["flags"]
    assert any("solvent_toluene" in m for m in sing["messages"])
    assert sing["mean_diameter_std_nm"] is None
    json.dumps(sing, allow_nan=False)  # JSON-ready even then


@pytest.mark.parametrize("q, y, start, kw, match", [
    (np.linspace(1.0, 5.0, 801), None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {},
     r"cover Q = 1\.000-5\.000 1/A: expected at least 1\.2-7 1/A"),
    (Q, None, {"mean_diameter_nm": float("nan"), "size_dispersion_pct": 10}, {}, "start.mean_diameter_nm = nan"),
    (Q, None, {"size_dispersion_pct": 10}, {}, "missing 'mean_diameter_nm'"),
    (Q, None, {"mean_diameter_nm": -3, "size_dispersion_pct": 10}, {}, "start.mean_diameter_nm = -3"),
    (Q, np.zeros(Q.size), {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {}, "all intensities"),
    (Q, np.ones(Q.size - 1), {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {}, "one intensity per Q"),
    (Q, None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {"solvent": ["benzine"]}, "solvent = 'benzine'"),
    (Q, None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {"background": "legendre", "background_degree": 40},
     "background_degree"),
    (Q, None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {"background": "fourier"}, "background = 'fourier'"),
    (Q, None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {"resolution": "0.01"}, "resolution = '0.01'"),
    (Q, None, {"mean_diameter_nm": 5, "size_dispersion_pct": 10}, {"q_range": (8.0, 3.0)}, "q_range"),
])
def test_bad_inputs_give_clear_errors(ladder, q, y, start, kw, match):
    y = np.full(q.size, 100.0) if y is None else y
    with pytest.raises(InputError, match=match):
        rf.refine(q, y, start, ladder=ladder, **kw)


def test_cli_refine_json_plot_and_errors(home, ladder, family_stats, tmp_path, capsys):
    """`qdsize refine FILE --from-json PRED.json` on a 2-theta file: JSON rows with the network's keys and a
    refined object, a plot; a bad estimates file or a short pattern gives one error line and exit code 2."""
    import qdsize.platform.cli_refine as cr
    from qdsize.platform.cli import main
    from qdsize.sim import measured

    pat = pattern.compose(family_stats, Q, 5.5, 10.0, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    f = tmp_path / "dots.xy"
    measured.write_pattern_file(f, TWO_THETA, observe(per_atom(pat), np.random.default_rng(2)), x_unit="2theta",
                                wavelength_angstrom=WAVELENGTH_A)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"file": str(f), "mean_diameter_nm": 5.1, "size_dispersion_pct": 14.0,
                                 "mean_diameter_std_nm": 0.3, "size_dispersion_std_pct": 3.0}]))
    png = tmp_path / "fit.png"
    assert main(["refine", str(f), "--from-json", str(pred), "--format", "json", "--plot", str(png),
                 "--shape", "sphere", "--solvent", "toluene"]) == 0
    rows = json.loads(capsys.readouterr().out)
    r = rows[0]["refined"]
    assert rows[0]["mean_diameter_nm"] == 5.1 and rows[0]["file"] == str(f)
    assert abs(r["mean_diameter_nm"] - pat.params["mean_diameter_nm"]) < 0.1
    assert {"mean_diameter_std_nm", "size_dispersion_std_pct", "lattice_parameter_angstrom", "b_iso", "scale",
            "background", "rwp", "reduced_chi2", "correlation", "flags", "n_evaluations", "seconds"} <= set(r)
    assert r["energy_kev"] == pytest.approx(ENERGY_KEV, rel=1e-6)  # from the file's wavelength header
    assert png.stat().st_size > 10_000
    assert r["ladder"]["shape"] == "sphere" and "solvent_toluene" in r["background"]
    assert r["accepted"] and r["answer"]["source"] == "refinement" and r["answer"]["mean_diameter_nm"] == \
        r["mean_diameter_nm"]

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["refine", str(f), "--from-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err

    short = tmp_path / "short.xy"
    measured.write_pattern_file(short, Q[Q < 5.0], np.full((Q < 5.0).sum(), 50.0), x_unit="q_A")
    pred.write_text(json.dumps([{"file": str(short), "mean_diameter_nm": 5.1, "size_dispersion_pct": 14.0}]))
    assert main(["refine", str(short), "--from-json", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "short.xy" in err and "expected at least 1.2-7 1/A" in err and "Traceback" not in err

    # refine_rows keeps the rows' order and keys, and reports a failing file without stopping the batch
    rows = [{"file": str(short), "mean_diameter_nm": 5.0, "size_dispersion_pct": 10.0, "model_uri": "m"},
            {"file": str(f), "mean_diameter_nm": 5.0, "size_dispersion_pct": 10.0, "model_uri": "m"}]
    out = cr.refine_rows(rows, [short, f], use_ray=False, shape="sphere", solvent="toluene")
    assert [o["file"] for o in out] == [str(short), str(f)] and out[1]["model_uri"] == "m"
    assert "short.xy" in out[0]["refined"]["error"]
    assert abs(out[1]["refined"]["mean_diameter_nm"] - pat.params["mean_diameter_nm"]) < 0.1
    assert out[1]["refined"]["background"]["solvent_toluene"] > 0
    with pytest.raises(InputError, match="shape = 'blob'"):
        cr.refine_rows(rows, [short, f], use_ray=False, shape="blob")
    with pytest.raises(InputError, match="solvent = 'benzine'"):
        cr.refine_rows(rows, [short, f], use_ray=False, solvent=["benzine"])


def test_batch_runs_in_parallel_on_ray(home, ladder, family_stats, tmp_path, ray_local):
    """A batch on Ray (workers read the family cache of this workspace) refines each file, in order."""
    import qdsize.platform.cli_refine as cr
    from qdsize.sim import measured

    files, truth = [], []
    for k, (m, c) in enumerate(((4.5, 8.0), (6.0, 14.0))):
        pat = pattern.compose(family_stats, Q, m, c, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
        truth.append(pat.params)
        f = tmp_path / f"s{k}.xy"
        measured.write_pattern_file(f, TWO_THETA, observe(per_atom(pat), np.random.default_rng(k)),
                                    x_unit="2theta", wavelength_angstrom=WAVELENGTH_A)
        files.append(f)
    starts = [{"mean_diameter_nm": 5.0, "size_dispersion_pct": 10.0}] * 2
    par = cr.refine_many(files, starts, use_ray=True)
    for res, t in zip(par, truth):
        assert not isinstance(res, str), res
        assert abs(res[0].refined["mean_diameter_nm"] - t["mean_diameter_nm"]) < 0.1
        assert abs(res[0].refined["size_dispersion_pct"] - t["size_dispersion_pct"]) < 2.0


# ----------------------------------------------------------------------------------------------------------------
# Robustness and the guard: patterns made by the independent benchmark's recipes, and patterns that are not PbS
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def independent():
    """benchmarks/independent_sim.py: ASE clusters, DebyeCalculator, its own experiment recipe (a small ladder)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import independent_sim

    return independent_sim, independent_sim.ladder_intensities("sphere", 5.5, 0.25, 7, None)


def test_independent_recipe_pattern_improves_on_a_biased_start(ladder, independent):
    """A pattern of the independent benchmark (other cluster cutter, other DSE code, its resolution, liquid residue,
    Compton-like rise, constant, Q-axis error, Poisson noise; nothing of our augmentation) refined from a start
    0.4 nm off (low counts, 2,000 at the top): the guard accepts it, the error is under half the start's, and of
    the two candidate families the as-cut surface (what the benchmark cuts) is chosen; its uncertainty covers the
    error."""
    isim, (q, d, pair, self_part) = independent
    qm, y, truth = isim.sample(q, d, pair, self_part, np.random.default_rng(4))
    assert truth["resolution"][0] > 0.005  # a real instrument width
    m_true = truth["mean_diameter_nm"]
    start = {"mean_diameter_nm": m_true + 0.4, "mean_diameter_std_nm": 0.3,
             "size_dispersion_pct": truth["size_dispersion_pct"] + 4.0, "size_dispersion_std_pct": 3.0}
    as_cut = rf.load_ladder(float(Q[0]), float(Q[-1]), spec={**SMALL_LADDER, "surface": "as_cut"})
    models = ({"shape": "sphere", "surface": "cation_rich"}, {"shape": "sphere", "surface": "as_cut"})
    res = rf.refine_models(qm, y, start, models=models, q_range=(1.0, 9.5),
                           ladders={("sphere", "cation_rich"): ladder, ("sphere", "as_cut"): as_cut})
    r = res.refined
    err = abs(r["answer"]["mean_diameter_nm"] - m_true)
    assert r["accepted"] and r["answer"]["source"] == "refinement", r["verdict"]
    assert err < 0.5 * 0.4, (r["answer"], m_true)
    assert err <= 2 * r["answer"]["mean_diameter_std_nm"]
    assert r["ladder"]["surface"] == "as_cut" and max(m["weight"] for m in r["models"]) > 0.9
    assert r["resolution"]["mode"] == "fit" and 0 < r["reduced_chi2"] < rf.POOR_FIT_CHI2
    assert set(res.components) >= {"particles", "smooth background"}
    assert np.allclose(sum(res.components.values()), res.model, rtol=1e-6, atol=1e-6 * res.model.max())


def _check_no_fake_zero(r):
    """A parameter at a bound or undetermined has no uncertainty (None), never a '± 0'."""
    stds = {"mean_diameter_nm": r["mean_diameter_std_nm"], "size_dispersion_pct": r["size_dispersion_std_pct"],
            "strain": r["strain_std"], "q_zero_inv_angstrom": r["q_zero_std_inv_angstrom"], "scale": r["scale_std"],
            **{f"b_iso_{el}": v for el, v in r["b_iso_std"].items()},
            **{k: r["resolution"].get(k.replace("_inv_angstrom", "_std_inv_angstrom") if "fwhm0" in k else k + "_std")
               for k in ("fwhm0_inv_angstrom", "fwhm_rel")}}
    for nm in r["at_bound"]:
        assert stds.get(nm, None) is None, (nm, stds[nm])
    assert all(v is None or v > 0 for v in stds.values()), stds


def test_pure_solvent_and_cdse_are_rejected_with_a_reason(ladder, capsys):
    """A pattern of solvent alone and one of CdSe dots (zinc blende): refined, but the guard keeps the network's
    answer and says why in one line (no PbS signal / a poor fit); no parameter at a bound reports '± 0'."""
    from qdsize.platform.cli_refine import emit_refined

    rng = np.random.default_rng(1)
    s = solvents.solvent_intensity("toluene", Q)
    x = 2.0 * (Q - Q[0]) / (Q[-1] - Q[0]) - 1.0
    solvent_only = rng.poisson(1e4 * (s / s.max() + 0.2 + 0.05 * x)).astype(np.float64)
    cdse = pattern.simulate(Q, material="cdse", diameter_nm=5.0, size_dispersion_pct=8.0, centre="random", seed=3,
                            b_iso=1.0, energy_kev=ENERGY_KEV)
    i = per_atom(cdse) + 0.2 * per_atom(cdse).mean()
    cdse_counts = rng.poisson(i * 3e4 / i.max()).astype(np.float64)
    start = {"mean_diameter_nm": 5.0, "mean_diameter_std_nm": 0.4, "size_dispersion_pct": 10.0,
             "size_dispersion_std_pct": 3.0}
    rows = []
    for label, y, why in (("solvent", solvent_only, "no significant PbS signal"), ("cdse", cdse_counts, "")):
        r = rf.refine(Q, y, start, energy_kev=ENERGY_KEV, ladder=ladder).refined
        assert not r["accepted"] and r["verdict"].startswith("rejected: ") and "\n" not in r["verdict"]
        assert why in r["verdict"]
        assert r["answer"] == {"source": "network", **{k: start[k] for k in start}}
        assert any(m.startswith("guard: refinement rejected") for m in r["messages"])
        _check_no_fake_zero(r)
        rows.append({"file": f"{label}.xy", "mean_diameter_nm": 5.0, "size_dispersion_pct": 10.0, "refined": r})
    assert rows[1]["refined"]["reduced_chi2"] > rf.GUARD_CHI2_MAX or rows[1]["refined"]["signal_gain"] < \
        rf.GUARD_SIGNAL_MIN
    emit_refined(rows, "table")
    out = capsys.readouterr().out
    assert out.count("rejected") == 2 and out.count("(network)") == 2 and "± 0.000 " not in out


def test_uncertainties_scale_with_the_fit_quality(ladder, family_stats):
    """Stated sigmas half the true noise make the reduced chi-square four times larger; the covariance is scaled
    by it, so the uncertainties stay those of the true weights (not half of them)."""
    pat = pattern.compose(family_stats, Q, 5.0, 10.0, b_iso=B_TRUE, energy_kev=ENERGY_KEV)
    y = observe(per_atom(pat), np.random.default_rng(21))
    start = {"mean_diameter_nm": 5.2, "size_dispersion_pct": 12.0}
    kw = dict(energy_kev=ENERGY_KEV, ladder=ladder, resolution="none", q_zero=False, n_starts=1)
    honest = rf.refine(Q, y, start, sigma=np.sqrt(np.maximum(y, 1.0)), **kw).refined
    tight = rf.refine(Q, y, start, sigma=0.5 * np.sqrt(np.maximum(y, 1.0)), **kw).refined
    assert honest["weighting"] == tight["weighting"] == "file"
    assert 0.7 < honest["reduced_chi2"] < 1.4 and tight["reduced_chi2"] == pytest.approx(4 * honest["reduced_chi2"],
                                                                                          rel=0.05)
    assert tight["uncertainty_scaled_by_chi2"]
    fit_std = [np.sqrt(max(r["mean_diameter_std_nm"] ** 2 - (rf.MODEL_FLOOR_REL * r["mean_diameter_nm"]) ** 2, 0))
               for r in (honest, tight)]
    assert fit_std[1] == pytest.approx(fit_std[0], rel=0.1)
    assert tight["size_dispersion_std_pct"] == pytest.approx(honest["size_dispersion_std_pct"], rel=0.1)


def test_refine_rows_options_shape_surface_solvent():
    """Refinement options (fit_options, as refine_rows and predict_files take them): shape "auto" (the default)
    tries every AUTO_MODELS family, a given surface applying to each; a named shape (also as the older
    ladder_spec={"shape": ...}) is tried with each of AUTO_SURFACES unless a surface is given; solvent is a name or
    names, checked; unknown options and values are refused, the accepted ones named."""
    auto = rf.fit_options({})
    assert auto["models"] == [dict(m) for m in rf.AUTO_MODELS] and "ladder_spec" not in auto
    stoich = rf.fit_options({"shape": "auto", "surface": "stoichiometric"})["models"]
    assert {m["surface"] for m in stoich} == {"stoichiometric"} and len(stoich) == len({m["shape"] for m in
                                                                                          rf.AUTO_MODELS})
    one = rf.fit_options({"shape": "cube", "surface": "as_cut"})
    assert one["ladder_spec"] == {"shape": "cube", "surface": "as_cut"} and "models" not in one
    old = rf.fit_options({"ladder_spec": {"shape": "octahedron"}, "solvent": "Toluene"})
    assert old["ladder_spec"] == {"shape": "octahedron"} and old["solvent"] == ("toluene",)
    assert old["models"] == [{"shape": "octahedron", "surface": sf} for sf in rf.AUTO_SURFACES]
    assert rf.fit_options({"solvent": ["hexane", "water"]})["solvent"] == ("hexane", "water")
    for bad_opts, match in (({"shape": "blob"}, "shape = 'blob'"), ({"surface": "oxidised"}, "surface = 'oxidised'"),
                            ({"solvent": ("benzine",)}, "solvent = 'benzine'"), ({"colour": 1}, "options")):
        with pytest.raises(InputError, match=match):
            rf.fit_options(bad_opts)


def test_finely_sampled_data_are_binned_to_the_tables_step_and_the_default_range_ends_at_10():
    """Area-detector files hold ~33,000 points (2-theta steps of 0.0036 deg): averaged in groups down to the tables'
    Q step, with sigma propagated as for a mean; the default fit range stops at the shared tables' reach."""
    q = np.linspace(1.0, 12.0, 33001)  # step 0.000333 1/A: groups of 12
    y = 100.0 + np.sin(q)
    s = np.full_like(q, 2.0)
    qb, yb, sb, k = rf.bin_points(q, y, s)
    assert k == 12 and qb.size == 33001 // 12
    assert qb[0] == pytest.approx(q[:12].mean()) and yb[1] == pytest.approx(y[12:24].mean())
    assert np.allclose(sb, 2.0 / np.sqrt(12))
    coarse = np.linspace(1.0, 9.0, 2001)  # step 0.004: as given
    assert rf.bin_points(coarse, coarse, coarse)[3] == 1
    assert rf.fit_range(q) == (1.0, rf.DEFAULT_Q_MAX_INV_ANGSTROM) and rf.fit_range(q, (1.5, 11.0)) == (1.5, 11.0)
    assert rf.fit_range(coarse) == (1.0, 9.0)
