"""Prediction: a saved network (weights, architecture, Q grid, classes) that sizes patterns, and its MLflow pyfunc."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qdsize.sim.contract import RESOLUTION_KEYS, Resolution
from qdsize.sim.errors import InputError

from . import evaluate, ood
from .model import ModelConfig, QDNet, current_state_names

WEIGHTS = "weights.pt"
CARD = "model.json"


@dataclass
class Predictor:
    """A network with everything needed to read its outputs: the Q grid it was trained on and the class edges."""

    model: QDNet
    q_inv_angstrom: np.ndarray
    size_edges_nm: list = field(default_factory=lambda: list(evaluate.SIZE_EDGES_NM))
    dispersion_edges_pct: list = field(default_factory=lambda: list(evaluate.DISPERSION_EDGES_PCT))
    model_uri: str = ""
    card: dict = field(default_factory=dict)
    physics: ood.PhysicsCheck | None = None  # is it this material's scattering at all (None: not checked)
    model_version: str = ""  # the registry version or the release that answers (reported with every answer)
    model_run_id: str = ""  # the training run it came from

    # ---- persistence: plain tensors (loaded with weights_only=True) and JSON, never pickled code
    def save(self, folder: str | Path, card: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, folder / WEIGHTS)
        meta = {"architecture": self.model.config.to_dict(), "q_inv_angstrom": np.asarray(self.q_inv_angstrom).tolist(),
                "size_edges_nm": list(self.size_edges_nm), "dispersion_edges_pct": list(self.dispersion_edges_pct),
                **(card or self.card)}
        (folder / CARD).write_text(json.dumps(meta, indent=1))
        if self.physics is not None:
            self.physics.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model_uri: str = "") -> "Predictor":
        folder = Path(folder)
        try:
            meta = json.loads((folder / CARD).read_text())
            state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        except (OSError, json.JSONDecodeError, RuntimeError) as exc:
            raise InputError(f"model = {str(folder)!r}: not a qdsize model folder ({exc})") from None
        old = {"position_channel": False, "resolution_input": False}  # what models saved before these inputs lack
        net = QDNet(ModelConfig(**{**old, **meta["architecture"]}))
        # buffers that models saved before lack: their defaults (1, 0, 1) reproduce those models
        since = {k: v for k, v in net.state_dict().items()
                 if k.endswith(("_var_power", "_fusion_power", "_fusion_temperature"))}
        net.load_state_dict({**since, **current_state_names(state)})
        net.eval()
        card = {k: v for k, v in meta.items() if k not in ("architecture", "q_inv_angstrom")}
        return cls(net, np.asarray(meta["q_inv_angstrom"]), meta["size_edges_nm"], meta["dispersion_edges_pct"],
                   model_uri or str(folder), card, ood.PhysicsCheck.load(folder))

    # ---- inference
    def resolution_missed(self, told) -> list[tuple[str, float, float, float]]:
        """(name, value, trained low, trained high) of each given resolution parameter outside the trained range."""
        trained = self.card.get("resolution_trained") or {}
        if told is None:
            return []
        out = []
        for name, v in zip(RESOLUTION_KEYS, told):
            lo, hi = trained.get(name, (0.0, float("inf")))
            if not lo - 1e-12 <= v <= hi + 1e-12:
                out.append((name, float(v), lo, hi))
        return out

    def resolution_outside(self, told) -> list[str]:
        """Why a given instrument resolution lies outside what the network was trained on (empty if inside)."""
        return [f"resolution {n} = {v:g} outside the trained {lo:g}-{hi:g}" for n, v, lo, hi in
                self.resolution_missed(told)]

    @property
    def takes_resolution(self) -> bool:
        """Whether the network can be told the instrument resolution (models trained since it could)."""
        return bool(self.model.config.resolution_input)

    @torch.no_grad()
    def predict(self, intensity: np.ndarray, mask: np.ndarray | None = None,
                resolution: tuple[float, float, float] | None = None) -> list[dict]:
        """Patterns on the model grid (n, n_q); NaN or mask 0 marks points the measurement does not cover.

        `resolution`: the instrument's, from a calibrant (fwhm0 in 1/A, fwhm_relative, lorentz_fraction; FWHM(Q) =
        sqrt(fwhm0^2 + (fwhm_relative Q)^2)), when known; it sharpens the sizes of large dots. Ignored (and said in
        the output) by a model that cannot take it.
        """
        x = np.atleast_2d(np.asarray(intensity, dtype=np.float32))
        if x.shape[1] != len(self.q_inv_angstrom):
            raise InputError(f"patterns: {x.shape[1]} points per pattern, expected {len(self.q_inv_angstrom)} "
                             "(the model's Q grid)")
        told = None
        if resolution is not None:
            told = check_resolution(resolution)
            if not self.takes_resolution:
                told = None
        m = np.isfinite(x).astype(np.float32) if mask is None else np.asarray(mask, dtype=np.float32)
        x = np.where(m > 0, np.nan_to_num(x), 0.0).astype(np.float32)
        pred = evaluate.predict_arrays(self.model, x, m, resolution=None if told is None else np.asarray(told))
        threshold = float(self.model.ood_threshold)
        if self.physics is not None:
            evidence, unlike = self.physics.flags(x, m)
        else:
            evidence, unlike = np.full(len(x), np.nan), np.zeros(len(x), dtype=bool)
        lo_nm, hi_nm = float(self.size_edges_nm[0]), float(self.size_edges_nm[-1])
        lo_pct, hi_pct = float(self.dispersion_edges_pct[0]), float(self.dispersion_edges_pct[-1])
        outside = self.resolution_outside(told)
        out = []
        for i in range(len(x)):
            sp, dp = pred["size_probs"][i], pred["dispersion_probs"][i]
            si, di = int(sp.argmax()), int(dp.argmax())
            mean, mean_std = float(pred["mean_diameter_nm"][i]), float(pred["mean_diameter_std_nm"][i])
            disp, disp_std = float(max(pred["size_dispersion_pct"][i], 0.0)), float(pred["size_dispersion_std_pct"][i])
            flags = []
            if pred["ood_score"][i] > threshold:
                flags.append(f"unlike the training patterns (score {pred['ood_score'][i]:.1f} > {threshold:.1f})")
            if unlike[i]:
                flags.append(f"not {self.card.get('material', 'PbS')}-like (material evidence {evidence[i]:.2f})")
            flags += outside
            # an estimate outside the trained labels is an extrapolation: say so and let its sigma reach the range
            if not lo_nm <= mean <= hi_nm:
                flags.append(f"size outside the trained {lo_nm:g}-{hi_nm:g} nm")
                mean_std = max(mean_std, abs(mean - min(max(mean, lo_nm), hi_nm)))
            if not lo_pct <= disp <= hi_pct:
                flags.append(f"dispersion outside the trained {lo_pct:g}-{hi_pct:g} %")
                disp_std = max(disp_std, abs(disp - min(max(disp, lo_pct), hi_pct)))
            out.append({
                "mean_diameter_nm": mean,
                "mean_diameter_std_nm": mean_std,
                "size_dispersion_pct": disp,
                "size_dispersion_std_pct": disp_std,
                "size_class": [self.size_edges_nm[si], self.size_edges_nm[si + 1]],
                "dispersion_class": [self.dispersion_edges_pct[di], self.dispersion_edges_pct[di + 1]],
                "size_class_probs": [round(float(p), 6) for p in sp],
                "dispersion_class_probs": [round(float(p), 6) for p in dp],
                "ood_score": float(pred["ood_score"][i]),
                "resolution_given": None if told is None else [float(v) for v in told],
                "material_evidence": None if np.isnan(evidence[i]) else round(float(evidence[i]), 4),
                "out_of_distribution": bool(flags),
                "flags": flags,
                "model_uri": self.model_uri,
                "model_version": self.model_version or None,
                "model_run_id": self.model_run_id or None,
            })
        return out


def check_resolution(resolution) -> tuple[float, float, float]:
    """(fwhm0_inv_angstrom, fwhm_relative, lorentz_fraction) from 2 or 3 numbers (eta 0 if not given), checked;
    a string is split at commas ("0.02,0.002"). See `qdsize.sim.contract.Resolution`."""
    return Resolution.parse(resolution).as_tuple()


try:
    import mlflow.pyfunc

    class PyfuncModel(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: patterns on the model grid in (rows of floats, NaN where not measured), JSON fields out.

        Params (in the signature, so a served model takes them too): `resolution`, the instrument's as
        "fwhm0,fwhm_relative[,lorentz_fraction]" (as `qdsize predict --resolution`; "" = not known), and
        `model_uri`, the URI reported in the output."""

        _skip_type_hint_validation = True  # input is a frame of floats, checked by the signature: no type hints

        def load_context(self, context):
            folder = Path(context.artifacts["qdsize_model"])
            release = builtin(folder.parent.parent)  # a release bundle answers under its builtin: name
            if release is not None:
                self.predictor = release
            else:  # a served or loaded run model answers with its training run, never with a file path
                self.predictor = Predictor.load(folder)
                run_id = self.predictor.card.get("run_id", "")
                self.predictor.model_run_id = run_id
                self.predictor.model_uri = f"runs:/{run_id}/model" if run_id else "mlflow-pyfunc"

        def predict(self, context, model_input, params=None):
            import pandas as pd

            x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
            params = params if isinstance(params, dict) else {}
            self.predictor.model_uri = params.get("model_uri") or self.predictor.model_uri
            resolution = params.get("resolution") or None
            return pd.DataFrame(self.predictor.predict(np.asarray(x, dtype=np.float32), resolution=resolution))
except ImportError:  # pragma: no cover - mlflow is a dependency; this keeps ml/ importable without it
    PyfuncModel = None


PYFUNC_PARAMS = {"resolution": "", "model_uri": ""}  # the pyfunc's params and their defaults


def _pyfunc_args(predictor: Predictor, example: np.ndarray, tmp: str) -> dict:
    """What mlflow.pyfunc.log_model and save_model take for a qdsize model: code (nothing pickled), the model folder
    as an artifact, signature with params, input example."""
    from mlflow.models import infer_signature

    folder = predictor.save(Path(tmp) / "qdsize_model")
    example = np.asarray(example, dtype=np.float32)
    out = PyfuncModel()
    out.predictor = predictor
    sig = infer_signature(example, out.predict(None, example), params=PYFUNC_PARAMS)
    code = str(Path(__file__).with_name("pyfunc_model.py"))  # models from code: no pickled Python object
    return dict(python_model=code, artifacts={"qdsize_model": str(folder)}, signature=sig, input_example=example,
                pip_requirements=["torch", "numpy", "pandas", "mlflow"])


def log_pyfunc(predictor: Predictor, example: np.ndarray, name: str = "model") -> str:
    """Log the predictor as an MLflow pyfunc with signature and input example; returns the model URI."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(name=name, **_pyfunc_args(predictor, example, tmp))
    return info.model_uri


def save_pyfunc(predictor: Predictor, example: np.ndarray, path: str | Path) -> Path:
    """Write the predictor as an MLflow pyfunc model folder (servable by `mlflow models serve -m PATH`)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(path=str(path), **_pyfunc_args(predictor, example, tmp))
    return Path(path)


def load(model_uri: str) -> Predictor:
    """A Predictor from a local folder or any MLflow model URI (models:/NAME@alias, models:/m-..., runs:/...), or
    the released model (`builtin`, `builtin:qdsize-pbs`, `builtin:qdsize-pbs/VERSION`)."""
    if model_uri == "builtin" or model_uri.startswith("builtin:"):
        return builtin_or_error(model_uri)
    p = Path(model_uri)
    if p.is_dir():
        if (p / "MLmodel").exists() and (p / "artifacts" / "qdsize_model").is_dir():  # a pyfunc folder (a bundle)
            p = p / "artifacts" / "qdsize_model"
        return Predictor.load(p, model_uri)
    import mlflow

    try:
        wrapper = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except Exception as exc:
        raise InputError(f"model = {model_uri!r}: could not be loaded ({str(exc).splitlines()[0][:200]})") from None
    if not hasattr(wrapper, "predictor"):
        raise InputError(f"model = {model_uri!r}: not a qdsize model")
    wrapper.predictor.model_uri = model_uri
    return wrapper.predictor


# The released model: an MLflow pyfunc folder shipped as package data, written only by `qdsize model export`.
RELEASED_NAME = "qdsize-pbs"
RELEASED_DIR = Path(__file__).with_name("released") / RELEASED_NAME
RELEASED_MODEL_DIR = RELEASED_DIR / "artifacts" / "qdsize_model"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


def released_card(folder: str | Path | None = None) -> dict | None:
    """The machine-readable model card of a release bundle (the installed one by default), or None."""
    path = Path(RELEASED_DIR if folder is None else folder) / CARD_JSON
    if not path.exists():
        return None
    return json.loads(path.read_text())


def builtin(folder: str | Path | None = None) -> Predictor | None:
    """The released PbS model shipped in the package (`builtin:qdsize-pbs/VERSION`), when present."""
    folder = Path(RELEASED_DIR if folder is None else folder)
    card = released_card(folder)
    if card is None or not (folder / "artifacts" / "qdsize_model" / WEIGHTS).exists():
        return None
    version = card["release"]["version"]
    p = Predictor.load(folder / "artifacts" / "qdsize_model", f"builtin:{RELEASED_NAME}/{version}")
    p.model_version = version
    p.model_run_id = card.get("source", {}).get("run_id", "")
    p.card["release"] = card
    return p


def builtin_or_error(model_uri: str = "builtin") -> Predictor:
    """`builtin`, `builtin:qdsize-pbs` or `builtin:qdsize-pbs/VERSION` (the installed version only)."""
    found = builtin()
    if found is None:
        raise InputError(f"model = {model_uri!r}: no released model is installed with this qdsize")
    name, _, version = model_uri.partition(":")[2].partition("/")
    if name not in ("", RELEASED_NAME):
        raise InputError(f"model = {model_uri!r}: no released model of that name; expected "
                         f"builtin:{RELEASED_NAME}")
    if version and version != found.model_version:
        raise InputError(f"model = {model_uri!r}: release {version!r} is not installed; this qdsize ships "
                         f"{found.model_uri}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# From files to answers: the library path that `qdsize predict` and the quickstart take
# ---------------------------------------------------------------------------------------------------------------
PATTERN_SUFFIXES = (".xy", ".xye", ".dat", ".chi", ".csv", ".txt", ".asc", ".int")
STDIN = "-"


def expand_inputs(paths) -> list[str]:
    """The pattern files named by `paths`: a folder stands for its pattern files (by suffix, sorted, not recursive);
    `-` (standard input), missing paths and folders without pattern files are kept as given, for the reader to
    name."""
    out: list[str] = []
    for p in paths:
        p = str(p)
        if p != STDIN and Path(p).is_dir():
            found = sorted(str(f) for f in Path(p).iterdir()
                           if f.suffix.lower() in PATTERN_SUFFIXES and f.is_file())
            out += found or [p]  # an empty folder stays, for predict_files to name
        else:
            out.append(p)
    return out


def predict_files(paths, model="builtin", resolution=None, refine: bool = False, *, x_unit=None,
                  wavelength_angstrom=None, energy_kev=None, force_wavelength: bool = False,
                  stdin_text: str | None = None, refine_options: dict | None = None, progress=None,
                  inputs: dict | None = None) -> list[dict]:
    """Size every measured pattern file: one dict per file, in order, with the prediction (`Predictor.predict`'s
    fields) or, for a file that cannot be read or covers too little Q, its `error`; each with its `warnings`.

        from qdsize.ml.predict import predict_files
        for row in predict_files(["a.xy", "b.xye"], resolution="0.0141,0.0012", refine=True):
            print(row["file"], row.get("mean_diameter_nm"), row.get("refined", {}).get("answer"), row.get("error"))

    `model`: a Predictor, or a URI for `load` ("builtin" is the released model). A folder in `paths` stands for
    its pattern files; "-" reads `stdin_text`. `refine`: then fit the exact DSE model to each answered pattern
    from the network's answer (`qdsize.sim.refine.refine_pattern`, in this process; options of
    `qdsize.sim.refine.fit_options` in `refine_options`, shape "auto" by default, a told resolution fixed): each
    row gets `refined`, the fit with the guard's verdict and the `answer` to report, or {"error": ...}.
    `progress`: wraps the list of files (e.g. a progress bar). `inputs`: a dict, filled with {file: (pattern,
    intensity on the model grid, mask)} for each answered file.
    """
    from qdsize.sim import measured

    predictor = load(model) if isinstance(model, str) else model
    told = None if resolution is None else check_resolution(resolution)
    files = expand_inputs(paths)
    q = predictor.q_inv_angstrom
    rows: list[dict] = []
    ok: list[tuple[int, np.ndarray, np.ndarray]] = []
    for f in (progress or (lambda xs: xs))(files):
        if f != STDIN and Path(f).is_dir():
            rows.append({"file": f, "error": f"{f}: folder holds no pattern files; expected files ending in "
                                             f"{', '.join(PATTERN_SUFFIXES)}", "warnings": []})
            continue
        try:
            pat = measured.read_pattern(f, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                                        energy_kev=energy_kev, force_wavelength=force_wavelength,
                                        text=stdin_text if f == STDIN else None)
            y, mask, warns = measured.resample(pat, q)
        except InputError as exc:
            rows.append({"file": f, "error": str(exc), "warnings": []})
            continue
        except OSError as exc:  # whatever the reader did not foresee: this file fails, the batch goes on
            rows.append({"file": f, "error": f"{f}: cannot be read ({exc.strerror or exc})", "warnings": []})
            continue
        rows.append({"file": f, "warnings": [*pat.warnings, *warns], "wavelength_angstrom": pat.wavelength_angstrom})
        ok.append((len(rows) - 1, pat, y, mask))
    if ok:
        x = np.stack([y for _, _, y, _ in ok])
        m = np.stack([mk for _, _, _, mk in ok])
        for (i, _, _, _), res in zip(ok, predictor.predict(x, m, resolution=told)):
            rows[i] = {"file": rows[i]["file"], **res, "warnings": rows[i]["warnings"],
                       "wavelength_angstrom": rows[i]["wavelength_angstrom"]}
    if inputs is not None:
        inputs.update({rows[i]["file"]: (pat, y, mk) for i, pat, y, mk in ok})
    if refine and ok:
        from qdsize.sim import refine as rf

        opts = {"resolution": (told[0], told[1]) if told is not None else "fit", **(refine_options or {})}
        opts = rf.fit_options(opts)
        for i, pat, _, _ in (progress or (lambda xs: xs))(ok):
            start = {k: rows[i][k] for k in rf.START_KEYS if rows[i].get(k) is not None}
            try:
                rows[i]["refined"] = {**rf.refine_pattern(pat, start, opts).refined, "warnings": list(pat.warnings)}
            except InputError as exc:
                rows[i]["refined"] = {"error": str(exc)}
    return rows

