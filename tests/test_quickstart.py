"""The quickstart's code path end to end on the smoke profile: dataset, sweep, champion, predictions, files."""

import json

from rich.console import Console

from qdsize.platform import quickstart


def test_smoke_profile_runs_the_whole_tour(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("QDSIZE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = quickstart.run("smoke", console=Console(file=open(tmp_path / "log.txt", "w"), width=120))
    assert out["model_uri"] == "models:/qdsize-pbs@champion"
    rows = out["rows"]
    assert len(rows) == len(quickstart.EXAMPLE_SPECS)
    assert all(r["true"] is not None and r["mean_diameter_nm"] > 0 for r in rows)
    for name in ("pbs_patterns.png", "predictions.json", "prediction.png"):
        assert (home / "quickstart" / name).stat().st_size > 0, name
    assert json.loads((home / "quickstart" / "predictions.json").read_text())[0]["file"].startswith("pbs_")
    assert (home / "mlflow.db").exists() and (home / "datasets" / "smoke" / "manifest.json").exists()
    log = (tmp_path / "log.txt").read_text()
    assert "qdsize ui" in log and "predicted D" in log
    # a second run reuses the dataset and the finished sweep
    again = quickstart.run("smoke", console=Console(file=open(tmp_path / "log2.txt", "w"), width=120))
    assert again["model_uri"] == out["model_uri"]
    assert "already finished" in (tmp_path / "log2.txt").read_text()
