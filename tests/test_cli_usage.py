"""The command line as a chemist meets it (issue 26, one test per point): usage errors in one line, a workspace
found from any folder, header wavelengths per file, piped tables in full, the answering model named, an instrument
outside training flagged, progress and --strict, spreadsheet-safe CSV, the calibrant checked, folders and stdin,
help with examples; and every subcommand given a bad value of each option type."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qdsize.sim import calibrant, measured

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EX_A = EXAMPLES / "pbs_A_toluene.xy"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


def qdsize(*args, home=None, cwd=None, env=None, stdin=None, prefix=(), timeout=300):
    """The CLI as a subprocess, output piped (as into a file or a log)."""
    e = {**os.environ, **(env or {})}
    if home is not None:
        e["QDSIZE_HOME"] = str(home)
    e.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*prefix, sys.executable, "-m", "qdsize.platform", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=e, input=stdin)


def one_error_line(r, *needles):
    """Exit 2, no traceback, exactly one `qdsize: error:` line naming what it should."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("qdsize: error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


BATCH_DRIVER = """
import contextlib, io, json, sys
from qdsize.platform.cli import main
out = []
for argv, stdin in json.loads(sys.stdin.read()):
    o, e = io.StringIO(), io.StringIO()
    sys.stdin = io.StringIO(stdin or "")
    with contextlib.redirect_stderr(e), contextlib.redirect_stdout(o):
        try:
            rc = main(argv)
        except BaseException as exc:  # what main() let through
            rc = f"escaped: {type(exc).__name__}: {exc}"
    out.append([rc, o.getvalue(), e.getvalue()])
sys.stdout = sys.__stdout__
print(json.dumps(out))
"""


class Run:
    """One CLI call's outcome, as subprocess.run's."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def batch(calls: dict, home, cwd) -> dict:
    """Many CLI calls in one subprocess (one interpreter start and model load for all): {name: (args, stdin)}
    -> {name: Run}; each call's stdout and stderr piped, as into a file or a log."""
    todo = [[list(map(str, args)), stdin] for args, stdin in calls.values()]
    r = subprocess.run([sys.executable, "-c", BATCH_DRIVER], input=json.dumps(todo), capture_output=True, text=True,
                       timeout=900, cwd=cwd, env={**{k: v for k, v in os.environ.items()
                                                      if k != "MLFLOW_TRACKING_URI"}, "QDSIZE_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: Run(*res) for name, res in zip(calls, json.loads(r.stdout.splitlines()[-1]))}


@pytest.fixture(scope="module")
def piped(home, tmp_path_factory):
    """The calls of points 1, 3, 4, 5, 7, 8, 9, 10 and 11, run once (their files made here)."""
    d = tmp_path_factory.mktemp("inputs")
    q, y = _calibrant_pattern("Si")
    measured.write_pattern_file(d / "si.xy", q, y, x_unit="q_A")
    folder = d / "run"
    folder.mkdir()
    for name in ("pbs_A_toluene.xy", "pbs_B_hexane.xye"):
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "notes.md").write_text("not a pattern")
    (d / "a.xy").symlink_to(d / "b.xy")
    (d / "b.xy").symlink_to(d / "a.xy")
    qn, i = np.loadtxt(EXAMPLES / "pbs_E_q_nm.csv", delimiter=",", skiprows=2).T  # Q in 1/nm ...
    np.savetxt(d / "nm.xy", np.stack([qn, i], 1))  # ... with no unit in the file, read as 1/A by --x-unit q_A
    three = [EX_A, EXAMPLES / "pbs_B_hexane.xye", EXAMPLES / "pbs_E_q_nm.csv"]
    wide = [EX_A, "--resolution", "0.5,0.002"]
    calls = {
        "version": (["--version"], None),
        "model info": (["model", "info"], None),
        "examples": ([*sorted(EXAMPLES.iterdir()), "--wavelength", "0.2066", "--format", "json"], None),
        "forced": ([EXAMPLES / "pbs_C_mo_ka.dat", "--wavelength", "0.75", "--force-wavelength", "--format", "json"],
                   None),
        "wide table": (wide, None),
        "wide json": ([*wide, "--format", "json"], None),
        "wide strict": ([*wide, "--strict", "--format", "json"], None),
        "csv one": ([EX_A, "--format", "csv"], None),
        "progress": ([*three, "--progress", "--strict", "--format", "json"], None),
        "quiet": ([*three, "--format", "json"], None),
        "csv": ([EX_A, d / "missing.xy", EXAMPLES / "pbs_F_large.xy", "--format", "csv"], None),
        "folder": ([folder, "--format", "json"], None),
        "stdin": (["-", "--format", "json"], EX_A.read_text()),
        "file": ([EX_A, "--format", "json"], None),
        "loop": ([d / "a.xy"], None),
        "nm": ([d / "nm.xy", "--x-unit", "q_A"], None),
    }
    calls = {k: (v if k in ("version", "model info") else ["predict", *v], stdin) for k, (v, stdin) in calls.items()}
    calls["si as lab6"] = (["resolution", d / "si.xy", "--standard", "LaB6"], None)
    calls["si"] = (["resolution", d / "si.xy", "--standard", "Si"], None)
    return batch(calls, home, d)


# 1 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (("predict",), "Missing argument"),
    (("predict", EX_A, "--wavelength", "abc"), "--wavelength"),
    (("simulate", ROOT / "conf/dataset/smoke.yaml", "--samples", "abc"), "--samples"),
    (("pattern", "--diameter-nm", "abc"), "--diameter-nm"),
    (("model", "bogus"), "bogus"),
])
def test_1_usage_errors_are_one_line_and_exit_2(args, needle, home):
    line = one_error_line(qdsize(*args, home=home), needle)
    assert "--help" in line  # where to read the options


def test_1_version_and_model_info_answer(piped):
    r = piped["version"]
    assert r.returncode == 0 and r.stdout.startswith("qdsize ") and "released model: builtin:qdsize-pbs/" in r.stdout
    r = piped["model info"]
    assert r.returncode == 0, r.stderr
    assert "serve:" in r.stdout and "MLFLOW_TRACKING_URI=" in r.stdout


def test_1_an_unreadable_file_fails_alone_in_its_batch(tmp_path, home):
    locked = tmp_path / "locked.xy"
    shutil.copy(EX_A, locked)
    locked.chmod(0)
    prefix = ()
    if os.geteuid() == 0:  # root reads anything: take the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    r = qdsize("predict", EX_A, locked, "--format", "json", home=home, prefix=prefix)
    one_error_line(r, str(locked), "ermission denied")
    rows = json.loads(r.stdout)
    assert "mean_diameter_nm" in rows[0] and rows[1]["file"] == str(locked) and "error" in rows[1]


# 2 ------------------------------------------------------------------------------------------------------------------
def test_2_the_workspace_is_found_from_any_folder_and_says_where(tmp_path):
    beam, user = tmp_path / "beamtime", tmp_path / "user"
    beam.mkdir()
    shutil.copy(EX_A, beam / "s.xy")
    env = {"HOME": str(user), "XDG_DATA_HOME": str(user / "data")}
    e = {k: v for k, v in os.environ.items() if k != "QDSIZE_HOME"}
    env = {**e, **env}

    def run(*args, cwd):
        return subprocess.run([sys.executable, "-m", "qdsize.platform", *args], capture_output=True, text=True,
                              cwd=cwd, env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}, timeout=300)

    r = run("predict", "s.xy", cwd=beam)
    assert r.returncode == 0 and "s.xy" in r.stdout, r.stderr
    assert sorted(p.name for p in beam.iterdir()) == ["s.xy"]  # nothing left behind in the data folder
    r = run("workspace", cwd=beam)
    assert str(user / "data" / "qdsize") in r.stdout and "per-user default" in r.stdout
    (beam / ".qdsize").mkdir()
    (beam / "day1").mkdir()
    r = run("workspace", cwd=beam / "day1")
    assert f"workspace: {beam / '.qdsize'}" in r.stdout and f".qdsize/ found in {beam}" in r.stdout
    r = run("workspace", "--tracking-uri", cwd=beam / "day1")
    assert r.stdout.strip() == f"sqlite:///{beam / '.qdsize' / 'mlflow.db'}"
    r = run("--help", cwd=beam)
    assert "QDSIZE_HOME" in r.stdout and "qdsize workspace" in r.stdout


# 3 ------------------------------------------------------------------------------------------------------------------
def test_3_each_file_keeps_its_header_wavelength_unless_forced(piped):
    r = piped["examples"]
    assert r.returncode == 0, r.stderr
    rows = {Path(x["file"]).name: x for x in json.loads(r.stdout)}
    assert len(rows) == len(list(EXAMPLES.iterdir())) and not any("error" in x for x in rows.values())
    assert rows["pbs_C_mo_ka.dat"]["wavelength_angstrom"] == pytest.approx(0.7093)
    assert rows["pbs_D_synchrotron.chi"]["wavelength_angstrom"] == pytest.approx(0.2066)
    warn = [ln for ln in r.stderr.splitlines() if "pbs_C_mo_ka.dat" in ln and "wavelength" in ln]
    assert len(warn) == 1 and "0.7093" in warn[0] and "0.2066" in warn[0] and "--force-wavelength" in warn[0]
    r = piped["forced"]
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["wavelength_angstrom"] == pytest.approx(0.75)
    assert "(forced)" in r.stderr and "0.7093" in r.stderr


# 4, 5, 7 share one run: an instrument far outside training, piped ---------------------------------------------
@pytest.fixture(scope="module")
def wide(piped):
    return piped["wide table"], piped["wide json"], piped["wide strict"]


def test_4_piped_tables_keep_every_column_and_no_colour_codes(wide):
    table, _, _ = wide
    assert table.returncode == 0, table.stderr
    row = next(ln for ln in table.stdout.splitlines() if ln.startswith("pbs_A_toluene.xy"))
    assert len(row) > 120 and "outside the trained" in row and "resolution" in row  # the flag column, whole
    header = table.stdout.splitlines()[0]
    assert header.split("  ")[0] == "file" and header.rstrip().endswith("flag")
    assert not ANSI.search(table.stdout) and not ANSI.search(table.stderr)
    assert all(ln.startswith("qdsize: ") for ln in table.stderr.splitlines()), table.stderr  # no library noise


def test_5_answers_name_the_model_version_and_run(wide, piped):
    table, js, _ = wide
    row = json.loads(js.stdout)[0]
    card = json.loads((ROOT / "ml/released/qdsize-pbs/model_card.json").read_text()) \
        if (ROOT / "ml/released/qdsize-pbs/model_card.json").exists() else None
    assert row["model_uri"].startswith("builtin:qdsize-pbs/") and row["model_version"]
    assert re.fullmatch(r"[0-9a-f]{32}", row["model_run_id"])
    if card is not None:
        assert row["model_run_id"] == card["source"]["run_id"]
    footer = table.stdout.splitlines()[-1]
    assert footer == f"model: {row['model_uri']} (version {row['model_version']}, run {row['model_run_id']})"
    csv_rows = list(csv.DictReader(io.StringIO(piped["csv one"].stdout)))
    assert csv_rows[0]["model_version"] == row["model_version"] and csv_rows[0]["model_run_id"] == row["model_run_id"]


def test_7_an_instrument_outside_training_is_flagged_with_an_honest_sigma(wide):
    _, js, strict = wide
    row = json.loads(js.stdout)[0]
    assert row["out_of_distribution"] and any("resolution" in f for f in row["flags"])
    lo, hi = 2.0, 12.0  # the released model's size labels
    d, s = row["mean_diameter_nm"], row["mean_diameter_std_nm"]
    assert lo <= d <= hi or (d - s <= hi and d + s >= lo), row  # outside the labels: sigma reaches back to them
    if not lo <= d <= hi:
        assert any("size outside the trained" in f for f in row["flags"])
    assert "outside what the model was trained on" in js.stderr
    assert strict.returncode == 3 and "--strict" in strict.stderr and json.loads(strict.stdout)[0]["flags"]


# 6 ------------------------------------------------------------------------------------------------------------------
def test_6_a_refinement_that_does_not_fit_is_rejected_with_its_reason_never_reported_with_zero_sigma(
        tmp_path, home, capsys, monkeypatch):
    png = tmp_path / "fit.png"
    r = qdsize("predict", EXAMPLES / "pbs_F_large.xy", "--refine", "--shape", "sphere", "--plot", png,
               "--format", "json", home=home)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    ref = row["refined"]
    assert ref["accepted"] is False and "reduced chi2" in ref["verdict"]  # 11 nm, 22 %: no sphere fits it
    assert ref["answer"]["source"] == "network" and ref["answer"]["mean_diameter_nm"] == row["mean_diameter_nm"]
    assert ref["reduced_chi2"] > 30
    for key in ("mean_diameter_std_nm", "size_dispersion_std_pct"):
        assert ref[key] is None or ref[key] > 0  # at a bound: no value, never a fake +- 0
    assert png.stat().st_size > 10_000  # data, fit, background parts and residual
    from qdsize.platform.cli_refine import emit_refined

    emit_refined([row], "table")
    table = capsys.readouterr().out
    assert not re.search(r"± 0\.0+(?![0-9])", table)  # no uncertainty printed as exactly zero
    assert "rejected" in table and "(network)" in table

    # the library path: the same answer and the same fit from predict_files(..., refine=True), in this process
    from qdsize.ml.predict import predict_files

    monkeypatch.setenv("QDSIZE_HOME", str(home))  # the tables the command built
    lib = predict_files([EXAMPLES / "pbs_F_large.xy", tmp_path / "none.xy"], refine=True,
                        refine_options={"shape": "sphere"})
    assert lib[0]["mean_diameter_nm"] == pytest.approx(row["mean_diameter_nm"], abs=1e-6)
    assert lib[0]["refined"]["verdict"] == ref["verdict"] and lib[0]["refined"]["answer"] == ref["answer"]
    assert lib[0]["refined"]["reduced_chi2"] == pytest.approx(ref["reduced_chi2"], rel=1e-6)
    assert "error" in lib[1] and "refined" not in lib[1]


# 8 ------------------------------------------------------------------------------------------------------------------
def test_8_progress_in_a_log_and_strict_passes_clean_answers(piped):
    r = piped["progress"]
    assert r.returncode == 0, r.stderr  # nothing flagged: --strict passes
    assert "qdsize: reading and sizing 3/3" in r.stderr
    assert len(json.loads(r.stdout)) == 3
    assert "reading and sizing" not in piped["quiet"].stderr  # piped without --progress: no progress lines


# 9 ------------------------------------------------------------------------------------------------------------------
def test_9_csv_is_spreadsheet_safe_with_error_rows_and_class_probabilities(piped):
    r = piped["csv"]
    assert r.returncode == 2
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [Path(x["file"]).name for x in rows] == ["pbs_A_toluene.xy", "missing.xy", "pbs_F_large.xy"]
    assert "file not found" in rows[1]["error"] and rows[1]["mean_diameter_nm"] == ""
    for x in (rows[0], rows[2]):
        assert x["error"] == ""
        lo, hi = float(x["size_class_min_nm"]), float(x["size_class_max_nm"])
        assert lo < float(x["mean_diameter_nm"]) <= hi + 0.5 and hi - lo == 1.0
        float(x["dispersion_class_min_pct"]), float(x["dispersion_class_max_pct"])
        numbers = [v for k, v in x.items() if k not in ("file", "flags", "error", "model_uri", "model_version",
                                                         "model_run_id", "out_of_distribution") and v != ""]
        assert all(len(v.partition(".")[2]) <= 4 for v in numbers), numbers  # no 16-digit numbers
        assert not any(re.fullmatch(r"\d+-\d+", v) for v in x.values())  # no "3-4" for a spreadsheet to date
        size_p = [float(v) for k, v in x.items() if k.startswith("p_") and k.endswith("_nm")]
        disp_p = [float(v) for k, v in x.items() if k.startswith("p_") and k.endswith("_pct")]
        assert len(size_p) == 10 and len(disp_p) == 4
        assert sum(size_p) == pytest.approx(1, abs=2e-3) and sum(disp_p) == pytest.approx(1, abs=2e-3)


# 10 -----------------------------------------------------------------------------------------------------------------
def _calibrant_pattern(standard: str, seed: int = 0):
    q = np.arange(1.0, 10.0, 0.004)
    y = np.full_like(q, 40.0) + 2.0 * q
    for _, qc in calibrant.reflections(standard, 1.0, 10.0):
        y += 50.0 * np.exp(-qc / 5) * calibrant.pseudo_voigt(q, qc, np.hypot(0.02, 0.002 * qc), 0.1)
    return q, np.random.default_rng(seed).poisson(y * 50) / 50.0


def test_10_a_calibrant_given_as_the_wrong_standard_is_refused(piped):
    one_error_line(piped["si as lab6"], "not a LaB6 pattern", "fit Si")
    r = piped["si"]
    assert r.returncode == 0 and "--resolution 0.02,0.002" in r.stdout, r.stderr


def test_10_every_standard_is_told_apart_from_the_others():
    for true in calibrant.STANDARDS:
        q, y = _calibrant_pattern(true, seed=1)
        for told in calibrant.STANDARDS:
            if told == true:
                assert calibrant.fit_resolution(q, y, told).fwhm0_inv_angstrom == pytest.approx(0.02, rel=0.05)
                continue
            with pytest.raises(measured.InputError, match=f"not a {told} pattern.*fit {true}"):
                calibrant.fit_resolution(q, y, told)


# 11 -----------------------------------------------------------------------------------------------------------------
def test_11_folders_stdin_symlink_loops_and_mislabelled_units(piped):
    r = piped["folder"]
    assert r.returncode == 0, r.stderr
    assert [Path(x["file"]).name for x in json.loads(r.stdout)] == ["pbs_A_toluene.xy", "pbs_B_hexane.xye"]
    r = piped["stdin"]
    assert r.returncode == 0, r.stderr
    from_stdin, from_file = json.loads(r.stdout)[0], json.loads(piped["file"].stdout)[0]
    assert from_stdin["file"] == "-" and from_stdin["mean_diameter_nm"] == pytest.approx(from_file["mean_diameter_nm"])
    one_error_line(piped["loop"], "symbolic link loop")
    one_error_line(piped["nm"], "what Q in 1/nm would read", "q_nm")


# 12 -----------------------------------------------------------------------------------------------------------------
def test_12_help_has_examples_and_flags_take_no_value(home):
    script = ("import sys; from qdsize.platform.cli import main\n"
              "for cmd in (['predict'], ['refine'], ['simulate'], ['model', 'info'], ['resolution']):\n"
              "    main([*cmd, '--help']); print('=====')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "QDSIZE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    pages = r.stdout.split("=====")[:-1]
    assert len(pages) == 5
    for page in pages:
        assert "Examples:" in page and "$ qdsize " in page, page[:400]
        assert "<bool>" not in page and "BOOLEAN" not in page
    assert "--refine " in pages[0] and "--strict " in pages[0]


def test_12_the_prediction_figure_has_a_colour_bar_room_for_the_peak_and_a_flag_banner():
    import matplotlib.pyplot as plt

    from qdsize.platform.figures import prediction_figure

    q = np.linspace(1.0, 10.0, 901)
    y = 1.0 + np.exp(-((q - 2.1) / 0.05) ** 2) * 30.0
    mask = np.ones_like(q)
    result = {"file": "s.xy", "mean_diameter_nm": 4.0, "mean_diameter_std_nm": 0.1, "size_dispersion_pct": 8.0,
              "size_dispersion_std_pct": 1.0, "size_class_probs": [0, 0, 1, 0], "dispersion_class_probs": [0, 1, 0],
              "material_evidence": 0.2, "out_of_distribution": True, "flags": ["not PbS-like (material evidence 0.20)"]}
    fig = prediction_figure(q, y, mask, np.sin(q), result, [2, 3, 4, 5, 6], [0, 5, 10, 20])
    main_ax, bar_ax = fig.axes[0], fig.axes[1]
    assert len(fig.axes) == 4
    assert "class-activation" in bar_ax.get_ylabel()
    top = main_ax.get_ylim()[1]
    assert top > np.max(y / y.mean()) * 1.02  # the strongest peak is not cut by the frame
    texts = " ".join(t.get_text() for t in main_ax.texts)
    assert "FLAGGED" in texts and "not PbS-like" in texts
    plt.close(fig)
    fig = prediction_figure(q, y, mask, np.sin(q), {**result, "out_of_distribution": False, "flags": []},
                            [2, 3, 4, 5, 6], [0, 5, 10, 20])
    assert not fig.axes[0].texts
    plt.close(fig)


def test_12_pattern_and_sample_legends_say_what_they_show():
    from qdsize.platform.cli import pattern_label, sample_label

    label = pattern_label({"material": "pbs", "shape": "cuboctahedron", "mean_diameter_nm": 5.0,
                           "size_dispersion_pct": 12.0, "surface": "cation_rich", "b_iso": {"Pb": 1.1, "S": 1.4}})
    assert "dispersion 12.0 %" in label and "surface cation_rich" in label and "B (Pb 1.1, S 1.4)" in label
    row = {"mean_diameter_nm": 3.42, "size_dispersion_pct": 7.1, "size_class": 1, "dispersion_class": 1,
           "shape": "sphere", "surface": "cation_rich"}
    labels = {"size_class_edges_nm": [2, 3, 4, 5], "dispersion_class_edges_pct": [0, 5, 10, 20]}
    assert "classes 3-4 nm, 5-10 %" in sample_label(row, labels)


# the README's promise: every subcommand, a bad value of every option type, one line and exit 2 -------------------
DRIVER = """
import contextlib, io, json, sys
from qdsize.platform.cli import main
out = []
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except BaseException as exc:  # what main() let through
            rc = f"escaped: {type(exc).__name__}: {exc}"
    out.append([argv, rc, err.getvalue()])
print(json.dumps(out))
"""


def _bad_value_cases(tmp_path):
    """(argv, what the error must name) for every command: each int and float option given 'abc', each flag given
    a value, and the string options the commands check given a value they do not take."""
    import typer

    import qdsize.platform.cli_ml  # noqa: F401  (registers its commands)
    import qdsize.platform.cli_model  # noqa: F401
    import qdsize.platform.cli_refine  # noqa: F401
    from qdsize.platform.cli import app

    estimates = tmp_path / "est.json"
    estimates.write_text("[]")
    positional = {"predict": [str(EX_A)], "refine": [str(EX_A)], "resolution": [str(EX_A)],
                  "simulate": [str(ROOT / "conf/dataset/smoke.yaml")], "train": [str(ROOT / "conf/train/smoke.yaml")],
                  "sweep": [str(ROOT / "conf/sweep/acnn.yaml")], "evaluate": ["builtin", str(tmp_path)],
                  "dataset info": [str(tmp_path)], "dataset show": [str(tmp_path)],
                  "model export": ["models:/qdsize-pbs@champion"]}
    cases, seen = [], set()

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            full = f"{prefix}{name}"
            if hasattr(cmd, "commands"):
                walk(cmd, full + " ")
                continue
            seen.add(full)
            base = [*full.split(), *positional.get(full, [])]
            for p in cmd.params:
                if not getattr(p, "opts", None) or p.param_type_name != "option" or p.name == "help":
                    continue
                opt = p.opts[0]
                kind = getattr(getattr(p, "type_descriptor", None), "annotation", None)  # typer's own click
                if kind is None:
                    kind = {"INT": int, "FLOAT": float}.get(getattr(getattr(p, "type", None), "name", "").upper())
                if getattr(p, "is_flag", False):
                    cases.append(([*base, f"{opt}=abc"], opt))
                elif kind in (int, float):
                    cases.append(([*base, opt, "abc"], opt))

    walk(typer.main.get_command(app), "")
    checked = [
        (["predict", str(EX_A), "--format", "xml"], "--format = 'xml'"),
        (["predict", str(EX_A), "--x-unit", "furlong"], "furlong"),
        (["predict", str(EX_A), "--resolution", "abc"], "abc"),
        (["predict", str(EX_A), "--model", str(tmp_path / "nomodel")], "nomodel"),
        (["resolution", str(EX_A), "--standard", "NaCl"], "NaCl"),
        (["resolution", str(EX_A), "--standard", "Si", "--format", "xml"], "xml"),
        (["refine", str(EX_A), "--from-json", str(tmp_path / "none.json")], "none.json"),
        (["refine", str(EX_A), "--from-json", str(estimates), "--format", "xml"], "xml"),
        (["pattern", "--diameter-nm", "4", "--shape", "blob", "-o", str(tmp_path / "p.xy")], "blob"),
        (["pattern", "--diameter-nm", "4", "--surface", "weird", "-o", str(tmp_path / "p.xy")], "weird"),
        (["pattern", "--diameter-nm", "4", "--b-iso", "Pb=x", "-o", str(tmp_path / "p.xy")], "Pb=x"),
        (["dataset", "show", str(tmp_path), "--split", "nope"], "nope"),
        (["dataset", "info", str(tmp_path / "nothing")], "nothing"),
        (["model", "info", "--format", "xml"], "xml"),
        (["simulate", str(ROOT / "conf/dataset/smoke.yaml"), "dataset.samples=abc"], "dataset.samples"),
        (["train", str(tmp_path / "missing.yaml")], "missing.yaml"),
    ]
    return cases + checked, seen


def test_every_subcommand_answers_a_bad_value_of_each_option_type_in_one_line(tmp_path, home):
    cases, commands = _bad_value_cases(tmp_path)
    assert {"predict", "simulate", "pattern", "train", "sweep", "evaluate", "refine", "resolution", "ui",
            "workspace", "dataset info", "dataset show", "model list", "model info", "model export",
            "augment-gallery"} <= commands
    assert len(cases) > 40
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps([a for a, _ in cases]), capture_output=True,
                       text=True, timeout=600, env={**os.environ, "QDSIZE_HOME": str(home)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    bad = []
    for (argv, rc, err), (_, needle) in zip(results, cases):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("qdsize: error:")]
        ok = rc == 2 and len(errors) == 1 and needle in errors[0] and all(ln.startswith("qdsize: ") for ln in lines)
        if not ok:
            bad.append((argv, rc, err[-500:]))
    assert not bad, bad
