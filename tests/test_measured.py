"""Measured patterns: every malformed input refused with one clear error, every format and unit read back right."""

from __future__ import annotations

import numpy as np
import pytest

from qdsize.sim import io
from qdsize.sim import measured as m
from qdsize.sim.errors import InputError

GRID = np.round(np.linspace(1.0, 10.0, 1801), 6)  # the default model grid, 0.005 1/A steps
WL_AG = 0.5594  # Ag K-alpha, Angstrom
E_MO = 17.48  # Mo K-alpha, keV


def curve(q):
    """A smooth analytic I(Q): Gaussian peaks near the PbS reflections on a sloping background."""
    peaks = [(1.83, 100.0, 0.08), (2.12, 60.0, 0.09), (3.0, 70.0, 0.1), (3.52, 30.0, 0.1), (4.24, 25.0, 0.12),
             (5.2, 15.0, 0.15), (6.0, 10.0, 0.15), (8.0, 5.0, 0.2)]
    return 20.0 + 2.0 * q + sum(a * np.exp(-((q - c) ** 2) / (2 * w**2)) for c, a, w in peaks)


def two_theta(q, wavelength):
    return np.degrees(2 * np.arcsin(q * wavelength / (4 * np.pi)))


def rows(x, y):
    return "\n".join(f"{a:.6f} {b:.6f}" for a, b in zip(x, y)) + "\n"


Q = np.arange(0.8, 10.5, 0.004)
GOOD_ROWS = rows(Q, curve(Q))


# ---------------------------------------------------------------------------------------------------- malformed
def _write(tmp_path, fname, content):
    p = tmp_path / fname
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _make_missing(tmp_path):
    return tmp_path / "nope.xy", {}


def _make_dir(tmp_path):
    d = tmp_path / "folder.xy"
    d.mkdir()
    return d, {}


def _make_huge(tmp_path):
    p = tmp_path / "huge.xy"
    with open(p, "wb") as f:  # sparse: no disk used, and the reader must refuse it before reading
        f.truncate(m.MAX_FILE_BYTES + 1)
    return p, {}


def _file(fname, content, **kw):
    return lambda tmp_path: (_write(tmp_path, fname, content), kw)


def _q_head(body):
    return "# q_A^-1 I\n" + body


N = 200
QS = np.linspace(1.0, 8.0, N)
IS = curve(QS)
MALFORMED = [
    ("missing file", _make_missing, ["file not found"]),
    ("directory", _make_dir, ["is a directory"]),
    ("huge file", _make_huge, ["too large", "200 MB"]),
    ("empty file", _file("empty.xy", ""), ["empty file"]),
    ("whitespace only", _file("blank.xy", "  \n\n \t\n"), ["empty file"]),
    ("binary file", _file("image.xy", bytes(range(256)) * 40), ["binary file"]),
    ("HDF5 file", _file("scan.xy", b"\x89HDF\r\n\x1a\n" + b"\x00" * 200), ["binary file", "HDF5"]),
    ("xlsx file", _file("sheet.csv", b"PK\x03\x04" + b"\x00\x01" * 100), ["binary file", "ZIP"]),
    ("latin-1 text", _file("latin.xy", ("# 2\xb0 step\n" + _q_head(rows(QS, IS))).encode("latin-1")),
     ["not UTF-8", "0xb0", "line 1"]),
    ("UTF-16 text", _file("wide.xy", _q_head(rows(QS, IS)).encode("utf-16")), ["not UTF-8", "UTF-16"]),
    ("header only", _file("head.xy", "# q_A^-1 I\n# nothing measured\n"), ["no rows of numbers"]),
    ("one column", _file("one.xy", "\n".join(f"{v:.4f}" for v in IS) + "\n"), ["one column"]),
    ("NaN value", _file("nan.xy", _q_head(rows(QS, IS).replace(f"{IS[40]:.6f}", "nan", 1))),
     ["NaN or infinity", "line 42"]),
    ("infinite value", _file("inf.xy", _q_head(rows(QS, IS).replace(f"{IS[7]:.6f}", "inf", 1))),
     ["NaN or infinity", "line 9"]),
    ("mostly negative", _file("neg.xy", _q_head(rows(QS, IS - IS.max() * 0.9))), ["negative at", "points"]),
    ("F(Q)-like oscillation", _file("fq.xy", _q_head(rows(QS, 50 * np.sin(3 * QS) * QS))), ["negative at"]),
    ("x not increasing", _file("order.xy", _q_head(rows(np.r_[QS[:100], QS[101], QS[100], QS[102:]], IS))),
     ["not increasing", "line 102"]),
    ("duplicated x", _file("dup.xy", _q_head(rows(np.r_[QS[:60], QS[60], QS[60:-1]], IS))),
     ["duplicated x", "lines 62 and 63"]),
    ("2-theta without wavelength", _file("tth.xy", "# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS)),
     ["2-theta", "no wavelength", m.FLAG_WAVELENGTH]),
    ("too few points", _file("few.xy", _q_head(rows(QS[::10], IS[::10]))), ["only 20 data points", "at least 50"]),
    ("ragged rows", _file("ragged.xy", _q_head(rows(QS, IS) + "8.1 3.0 0.5\n")), ["ragged rows", "line 202"]),
    ("text in a numeric column",
     _file("text.xy", _q_head(rows(QS[:90], IS[:90]) + "3.2 n/a\n" + rows(QS[91:], IS[91:]))),
     ["line 92", "'n/a'", "where a number belongs"]),
    ("empty CSV field", _file("hole.csv", "q_A^-1,I\n" + "".join(f"{a},{b}\n" for a, b in zip(QS, IS))
                              .replace(f"{QS[5]},{IS[5]}", f"{QS[5]},")), ["line 7", "empty field"]),
    ("all-zero intensity", _file("zero.xy", _q_head(rows(QS, 0 * QS))), ["all intensities are zero"]),
    ("2-theta above 180", _file("wide.xy", "# 2th_deg I\n" + rows(np.linspace(5, 200, N), IS)), ["above 180"]),
    ("negative 2-theta", _file("negt.xy", "# 2th_deg I\n" + rows(np.linspace(-5, 100, N), IS)), ["negative 2-theta"]),
    ("negative Q", _file("negq.xy", _q_head(rows(np.linspace(-1, 8, N), IS))), ["negative Q"]),
    ("wavelength not positive", _file("wl.xy", "# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS),
                                      wavelength_angstrom=-0.5594), ["wavelength_angstrom", "not positive"]),
    ("energy not positive", _file("en.xy", "# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS), energy_kev=0.0),
     ["energy_kev", "not positive"]),
    ("header wavelength zero", _file("wl0.xy", "# wavelength: 0\n# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS)),
     ["wavelength on header line 1", "not positive"]),
    ("wavelength and energy disagree", _file("both.xy", "# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS),
                                             wavelength_angstrom=WL_AG, energy_kev=E_MO), ["disagree"]),
    ("unit flag conflicts with header", _file("conf.dat", "# 2th_deg I\n" + rows(np.linspace(5, 80, N), IS),
                                              x_unit="q_A"), ["conflicts with the header", "2-theta"]),
    ("unknown unit flag", _file("flag.xy", rows(QS, IS), x_unit="degrees"), ["not a known x unit", "q_nm"]),
    ("no unit anywhere", _file("plain.xy", rows(QS, IS)), ["no header line states the x unit", m.FLAG_X_UNIT]),
    ("bare Q column", _file("bare.csv", "q,intensity\n" + "".join(f"{a},{b}\n" for a, b in zip(QS, IS))),
     ["'q' does not say whether Q is in 1/A or 1/nm", "q_nm"]),
    ("two units in header", _file("two.xy", "# x axis: 2theta (deg)\n# converted to Q (1/A)\n# data\n" + rows(QS, IS)),
     ["more than one x unit", m.FLAG_X_UNIT]),
    ("unsupported pyFAI unit", _file("r.dat", "#           r_mm              I\n" + rows(QS, IS)), ["'r_mm'"]),
]


@pytest.mark.parametrize("label,make,needles", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_refused_with_the_file_and_problem(tmp_path, label, make, needles):
    path, kwargs = make(tmp_path)
    with pytest.raises(InputError) as exc:
        m.read_pattern(path, **kwargs)
    msg = str(exc.value)
    assert msg.startswith(str(path) + ": "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "expected" in msg, msg
    assert "\n" not in msg


def test_there_are_at_least_twenty_malformed_cases():
    assert len(MALFORMED) >= 20


# ---------------------------------------------------------------------------------------------------- round trips
UNIT_CASES = [  # (x_unit, wavelength written to the header, reader kwargs)
    ("q_A", None, {}),
    ("q_nm", None, {}),
    ("2theta", WL_AG, {}),  # wavelength 0.5594 A read from the header (given as an argument for .chi)
    ("2theta", None, {"energy_kev": E_MO}),
]


@pytest.mark.parametrize("fmt", m.FORMATS)
@pytest.mark.parametrize("unit,header_wl,kwargs", UNIT_CASES, ids=["q_A", "q_nm", "2theta-wavelength", "2theta-energy"])
def test_round_trip_every_format_and_unit(tmp_path, fmt, unit, header_wl, kwargs):
    q = np.arange(0.8, 10.5, 0.004)
    wl = header_wl or (m.HC_KEV_ANGSTROM / kwargs["energy_kev"] if "energy_kev" in kwargs else None)
    x = {"q_A": q, "q_nm": 10 * q, "2theta": two_theta(q, wl) if wl else None}[unit]
    path = m.write_pattern_file(tmp_path / f"sample.{fmt}", x, curve(q), x_unit=unit, wavelength_angstrom=header_wl)
    if fmt == "chi" and header_wl:  # a Fit2D .chi has no wavelength line
        kwargs = {"wavelength_angstrom": header_wl}
    pat = m.read_pattern(path, **kwargs)
    assert pat.x_unit_detected == unit
    assert pat.warnings == []
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-8, atol=1e-9)
    assert (pat.sigma is not None) == (fmt == "xye")
    if unit == "2theta":
        assert pat.wavelength_angstrom == pytest.approx(wl, rel=1e-9)
    intensity, mask, warnings = m.resample(pat, GRID)
    assert intensity.dtype == np.float32 and mask.dtype == np.float32 and warnings == []
    assert mask.sum() == len(GRID)
    # linear interpolation of a curve with peaks 0.08 1/A wide, sampled every 0.004 1/A: <= f'' h^2 / 8
    np.testing.assert_allclose(intensity, curve(GRID), atol=0.05, rtol=0)


def test_two_theta_with_energy_17_48_kev_is_mo_k_alpha(tmp_path):
    wl = m.HC_KEV_ANGSTROM / E_MO
    assert wl == pytest.approx(0.7093, abs=2e-4)
    q = np.linspace(1.0, 9.0, 1500)
    path = m.write_pattern_file(tmp_path / "mo.xy", two_theta(q, wl), curve(q), x_unit="2theta")
    pat = m.read_pattern(path, energy_kev=E_MO)
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-8)
    with pytest.raises(InputError, match="no wavelength"):
        m.read_pattern(path)


def test_fine_steps_are_bin_averaged_so_noise_is_not_aliased(tmp_path):
    rng = np.random.default_rng(3)
    q = np.arange(0.9, 10.2, 0.0005)  # ten measured points per grid step
    noise = 2.0
    path = m.write_pattern_file(tmp_path / "fine.xy", q, curve(q) + rng.normal(0, noise, len(q)), x_unit="q_A")
    intensity, mask, _ = m.resample(m.read_pattern(path), GRID)
    resid = (intensity - curve(GRID))[mask > 0]
    assert resid.std() < 0.5 * noise  # plain interpolation would keep the full noise
    assert abs(resid.mean()) < 0.1


def test_coarse_steps_are_interpolated_by_cubic_splines_that_keep_peak_widths(tmp_path):
    q = np.arange(0.5, 11.0, 0.02)
    y = 3.0 + 0.5 * q - 0.02 * q ** 2 + 0.001 * q ** 3  # a cubic: the spline is exact
    pat = m.read_pattern(m.write_pattern_file(tmp_path / "coarse.xy", q, y, x_unit="q_A"))
    intensity, mask, _ = m.resample(pat, GRID)
    np.testing.assert_allclose(intensity, 3.0 + 0.5 * GRID - 0.02 * GRID ** 2 + 0.001 * GRID ** 3, rtol=1e-6)

    # a 10 nm dot's peak (FWHM 0.056 1/A) measured every 0.015 1/A: the spline keeps its height and width within
    # 1 %; linear interpolation flattens it (the network then reads the dot ~0.2 nm small)
    def peak(x):
        return 1.0 + 100.0 * np.exp(-4 * np.log(2) * ((x - 3.0375) / 0.056) ** 2)

    def fwhm(y):
        above = GRID[y - 1.0 >= (y.max() - 1.0) / 2]
        return above[-1] - above[0]

    q = np.arange(0.9, 10.2, 0.015)
    intensity, _, _ = m.resample(m.read_pattern(m.write_pattern_file(tmp_path / "peak.xy", q, peak(q),
                                                                      x_unit="q_A")), GRID)
    assert intensity.max() == pytest.approx(peak(GRID).max(), rel=0.01)
    assert fwhm(intensity) == pytest.approx(fwhm(peak(GRID)), abs=0.0051)  # within one grid step
    linear = np.interp(GRID, q, peak(q))
    assert linear.max() < 0.97 * peak(GRID).max()  # what the spline replaces


# ---------------------------------------------------------------------------------------------------- headers
PYFAI_HEAD = """# == pyFAI calibration ==
# Distance Sample to Detector: 0.25 m
# PONI: 1.023e-01, 9.871e-02 m
# Rotations: 0.001200 -0.000400 0.000000 rad
#
# == Fit2d calibration ==
# Distance Sample-beamCenter: 250.012 mm
# Center: x=574.000, y=595.000 pix
# Tilt: 0.073 deg  TiltPlanRotation: -71.6 deg
#
# Detector Pilatus CdTe 2M	 Spline= None	 PixelSize= 1.720e-04, 1.720e-04 m
#    Detector has a mask: True
#
# Wavelength: {wl}
# Mask applied: True
# Dark current applied: False
# Flat field applied: False
# Polarization factor: 0.99
# Normalization factor: 1.0
# --> /data/run7/Q_scan_2theta_0001.edf
#{unit:>14s}  {i:>14s}  {s:>14s}
"""


@pytest.mark.parametrize("unit,scale,wl_text,expect", [
    ("2th_deg", None, "5.594e-11", "2theta"),  # pyFAI writes the wavelength in metres, without a unit
    ("2th_deg", None, "5.594000e-11 m", "2theta"),
    ("q_nm^-1", 10.0, "5.594e-11", "q_nm"),
    ("q_A^-1", 1.0, "5.594e-11", "q_A"),
    ("2th_rad", None, "5.594e-11", "2theta_rad"),
])
def test_pyfai_headers_give_unit_and_wavelength(tmp_path, unit, scale, wl_text, expect):
    q = np.arange(0.9, 9.0, 0.004)
    if unit == "2th_deg":
        x = two_theta(q, WL_AG)
    elif unit == "2th_rad":
        x = np.radians(two_theta(q, WL_AG))
    else:
        x = q * scale
    sig = np.sqrt(curve(q))
    body = "\n".join(f"{a:14.6e}  {b:14.6e} {c:14.6e}" for a, b, c in zip(x, curve(q), sig))
    path = tmp_path / "pyfai.dat"
    path.write_text(PYFAI_HEAD.format(wl=wl_text, unit=unit, i="I ", s="sigma ") + body + "\n")
    pat = m.read_pattern(path)
    assert pat.x_unit_detected == expect
    assert pat.header["wavelength_angstrom"] == pytest.approx(WL_AG)
    assert "line 21" in pat.header["x_unit_source"]
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=2e-6)
    np.testing.assert_allclose(pat.sigma, sig, rtol=1e-5)
    assert pat.header["fields"]["Polarization factor"] == "0.99"


def test_fit2d_chi_with_fortran_numbers_and_point_count(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    tth = two_theta(q, WL_AG)
    body = "\n".join(f"  {a:.6E}  {b:.6E}" for a, b in zip(tth, curve(q)))
    path = tmp_path / "fit2d.chi"
    path.write_text(f"sample_001.tif: Azimuthal Integration\n2-Theta Angle (Degrees)\nIntensity\n{len(q):>11d}\n"
                    + body + "\n")
    pat = m.read_pattern(path, wavelength_angstrom=WL_AG)
    assert pat.x_unit_detected == "2theta" and pat.header["points_declared"] == len(q)
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-5)
    assert pat.warnings == []
    path.write_text(path.read_text().replace(f"{len(q):>11d}", "       9999"))
    assert any("declares 9999 points" in w for w in m.read_pattern(path, wavelength_angstrom=WL_AG).warnings)


@pytest.mark.parametrize("head,expect", [
    ("Q(1/A),I\n", "q_A"), ("Q [nm^-1],I\n", "q_nm"), ("2theta,I\n", "2theta"), ("TwoTheta;Intensity\n", "2theta"),
    ("# wavelength: 0.5594\n\"2Theta\",\"Counts\"\n", "2theta"), ("q (Å⁻¹),I\n", "q_A"),
])
def test_csv_header_rows_and_delimiters(tmp_path, head, expect):
    q = np.arange(1.0, 8.0, 0.01)
    x = {"q_A": q, "q_nm": 10 * q, "2theta": two_theta(q, WL_AG)}[expect]
    delim = ";" if ";" in head else ","
    path = tmp_path / "table.csv"
    path.write_text(head + "".join(f"{a:.8f}{delim}{b:.8f}\n" for a, b in zip(x, curve(q))), encoding="utf-8")
    pat = m.read_pattern(path, wavelength_angstrom=None if "wavelength" in head else WL_AG)
    assert pat.x_unit_detected == expect
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-6)


def test_decimal_commas_with_semicolons_and_comment_styles(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    lines = ["! exported by a diffractometer", "% sample: PbS in toluene", "; Q in 1/A", "' operator: x"]
    lines += [f"{a:.5f};{b:.5f}".replace(".", ",") for a, b in zip(q, curve(q))]
    path = tmp_path / "euro.txt"
    path.write_text("\r\n".join(lines) + "\r\n")
    pat = m.read_pattern(path)
    assert pat.x_unit_detected == "q_A"
    np.testing.assert_allclose(pat.intensity, curve(q), atol=1e-5)
    assert any("decimal commas" in w for w in pat.warnings)


def test_leading_text_lines_without_comment_marks(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    path = tmp_path / "instrument.dat"
    path.write_text("Sample PbS-QD batch 12\nMeasured 2024-05-12 at 295 K\nx unit: Q (A^-1)\n"
                    + "\t".join(["q", "I"]) + "\n" + "".join(f"{a}\t{b}\n" for a, b in zip(q, curve(q))))
    pat = m.read_pattern(path)
    assert pat.x_unit_detected == "q_A" and pat.header["columns"] == ["q", "I"]
    assert len(pat.header["lines"]) == 4


def test_qdsize_simulated_pattern_file_reads_as_q_in_inverse_angstrom(tmp_path):
    q = np.arange(1.0, 10.0, 0.005)
    path = tmp_path / "sim.xy"
    io.write_pattern(path, q, curve(q), {"material": "pbs", "energy_kev": None, "mean_diameter_nm": 5.0})
    pat = m.read_pattern(path)
    assert pat.x_unit_detected == "q_A" and pat.wavelength_angstrom is None
    np.testing.assert_allclose(pat.intensity, curve(q), rtol=1e-9)


def test_flag_resolves_a_missing_unit_and_agrees_with_the_header(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    path = m.write_pattern_file(tmp_path / "plain.xy", 10 * q, curve(q), x_unit="q_nm", units_in_header=False)
    pat = m.read_pattern(path, x_unit="q_nm")
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-9)
    assert pat.header["x_unit_source"] == f"{m.FLAG_X_UNIT} q_nm"
    labelled = m.write_pattern_file(tmp_path / "labelled.xy", 10 * q, curve(q), x_unit="q_nm")
    assert m.read_pattern(labelled, x_unit="q_nm").x_unit_detected == "q_nm"


def test_flag_resolves_a_header_that_names_two_units(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    path = tmp_path / "two.xy"
    path.write_text("# x axis: 2theta (deg)\n# converted to Q (1/A)\n" + rows(q, curve(q)))
    pat = m.read_pattern(path, x_unit="q_A")
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-6)


def test_header_wavelength_wins_over_the_argument_unless_forced(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    path = m.write_pattern_file(tmp_path / "wl.xy", two_theta(q, 0.7093), curve(q), x_unit="2theta",
                                wavelength_angstrom=0.7093)
    pat = m.read_pattern(path, wavelength_angstrom=WL_AG)  # one --wavelength for a batch: the file's header wins
    np.testing.assert_allclose(pat.q_inv_angstrom, q, rtol=1e-8)
    assert any("header's wavelength 0.7093 A (line 2), not the given" in w for w in pat.warnings)
    forced = m.read_pattern(path, wavelength_angstrom=WL_AG, force_wavelength=True)
    np.testing.assert_allclose(forced.q_inv_angstrom, q * 0.7093 / WL_AG, rtol=1e-6, atol=0.02)
    assert any("(forced); the header (line 2) says 0.7093" in w for w in forced.warnings)


def test_decreasing_x_is_reversed_with_a_warning(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)[::-1]
    pat = m.read_pattern(m.write_pattern_file(tmp_path / "down.xye", q, curve(q), x_unit="q_A"))
    assert np.all(np.diff(pat.q_inv_angstrom) > 0)
    np.testing.assert_allclose(pat.intensity, curve(pat.q_inv_angstrom), rtol=1e-9)
    assert any("reversed" in w for w in pat.warnings)


def test_small_negatives_after_background_subtraction_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    q = np.arange(1.0, 8.0, 0.005)
    y = curve(q) - 2.0 * q - 20.0 + rng.normal(0, 0.5, len(q))  # background removed: the tails scatter about 0
    assert (y < 0).mean() > 0.1
    pat = m.read_pattern(m.write_pattern_file(tmp_path / "sub.xy", q, y, x_unit="q_A"))
    assert any("slightly negative" in w for w in pat.warnings)


def test_negative_third_column_is_not_taken_as_sigma(tmp_path):
    q = np.arange(1.0, 8.0, 0.01)
    path = m.write_pattern_file(tmp_path / "three.xye", q, curve(q), x_unit="q_A", sigma=np.sin(q))
    pat = m.read_pattern(path)
    assert pat.sigma is None and any("not an uncertainty" in w for w in pat.warnings)


# ---------------------------------------------------------------------------------------------------- coverage
def _covering(tmp_path, lo, hi, step=0.003):
    q = np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    return m.read_pattern(m.write_pattern_file(tmp_path / f"cov_{lo}_{hi}.xy", q, curve(q), x_unit="q_A"))


def test_slightly_short_coverage_warns_and_masks_exactly(tmp_path):
    pat = _covering(tmp_path, 1.25, 6.99)
    intensity, mask, warnings = m.resample(pat, GRID)
    assert len(warnings) == 1 and "1.250-6.990" in warnings[0] and "1.200-7.000" in warnings[0]
    lo, hi = pat.q_inv_angstrom[0], pat.q_inv_angstrom[-1]
    expected = (GRID >= lo) & (GRID <= hi)
    assert np.array_equal(mask, expected.astype(np.float32))
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert np.all(intensity[mask == 0] == 0)
    assert np.all(intensity[mask == 1] > 0)
    np.testing.assert_allclose(intensity[mask == 1], curve(GRID[mask == 1]), atol=0.05)


def test_unaligned_coverage_masks_every_grid_point_outside(tmp_path):
    pat = _covering(tmp_path, 1.1987, 7.4037)
    _, mask, warnings = m.resample(pat, GRID)
    assert warnings == []
    q_in = GRID[mask == 1]
    assert q_in[0] == pytest.approx(1.2) and q_in[-1] == pytest.approx(7.4)
    assert mask.sum() == round((7.4 - 1.2) / 0.005) + 1
    assert np.array_equal(mask, ((GRID >= 1.1987) & (GRID <= 7.4037)).astype(np.float32))


def test_short_coverage_is_refused_with_both_ranges(tmp_path):
    pat = _covering(tmp_path, 1.5, 6.0)
    with pytest.raises(InputError) as exc:
        m.resample(pat, GRID)
    msg = str(exc.value)
    assert msg.startswith(str(tmp_path / "cov_1.5_6.0.xy") + ": ")
    assert "1.500-6.000" in msg and "1.200-7.000" in msg


@pytest.mark.parametrize("lo,hi,refused", [(1.29, 7.0, False), (1.31, 7.0, True), (1.2, 6.91, False),
                                           (1.2, 6.89, True)])
def test_coverage_margin_boundary(tmp_path, lo, hi, refused):
    pat = _covering(tmp_path, lo, hi, step=0.01)
    if refused:
        with pytest.raises(InputError, match="too short"):
            m.resample(pat, GRID)
    else:
        assert len(m.resample(pat, GRID)[2]) == 1


def test_two_theta_coverage_message_names_the_measured_angles(tmp_path):
    q = np.arange(1.0, 5.0, 0.004)
    path = m.write_pattern_file(tmp_path / "short.xy", two_theta(q, WL_AG), curve(q), x_unit="2theta",
                                wavelength_angstrom=WL_AG)
    with pytest.raises(InputError, match=r"deg at 0\.5594 A"):
        m.resample(m.read_pattern(path), GRID)


def test_gap_in_the_data_is_masked(tmp_path):
    q = np.arange(0.9, 9.0, 0.004)
    q = q[(q < 3.3) | (q > 3.6)]
    pat = m.read_pattern(m.write_pattern_file(tmp_path / "gap.xy", q, curve(q), x_unit="q_A"))
    intensity, mask, warnings = m.resample(pat, GRID)
    in_gap = (GRID > 3.31) & (GRID < 3.59)
    assert np.all(mask[in_gap] == 0) and np.all(intensity[in_gap] == 0)
    assert mask[(GRID > 1.0) & (GRID < 3.29)].all() and mask[(GRID > 3.61) & (GRID < 8.99)].all()
    assert any("no data between" in w for w in warnings)


def test_bad_grid_is_refused(tmp_path):
    pat = _covering(tmp_path, 1.0, 8.0)
    with pytest.raises(InputError, match="q_grid"):
        m.resample(pat, GRID[::-1])
