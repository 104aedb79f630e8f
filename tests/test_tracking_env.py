"""Precedence of the tracking store: FER_TRACKING_URI > config file > the user's MLFLOW_TRACKING_URI >
the workspace's SQLite file; the value MLflow itself writes is never taken for the user's."""

from __future__ import annotations

from fer_platform.settings import MLFLOW_TRACKING_ENV, MLFLOW_URI_SET_ENV, Settings
from fer_platform.workspace import Workspace


def test_precedence(tmp_path):
    home = {"FER_HOME": str(tmp_path)}
    default = f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert Settings.load(env=home).tracking_uri == default
    user = {**home, MLFLOW_TRACKING_ENV: "http://mlflow.example:5000"}
    assert Settings.load(env=user).tracking_uri == "http://mlflow.example:5000"
    assert Settings.load(env=user).is_set("tracking_uri")
    (tmp_path / "fer.yaml").write_text("tracking_uri: http://from-file:5000\n")
    assert Settings.load(env={**user, "FER_CONFIG": str(tmp_path / "fer.yaml")}).tracking_uri == "http://from-file:5000"
    assert Settings.load(env={**user, "FER_TRACKING_URI": "http://fer:5000"}).tracking_uri == "http://fer:5000"


def test_the_value_mlflow_wrote_for_the_platform_is_ignored(tmp_path):
    written = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    env = {"FER_HOME": str(tmp_path), MLFLOW_TRACKING_ENV: written, MLFLOW_URI_SET_ENV: written}
    assert Settings.load(env=env).tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"


def test_setup_tracking_uses_and_keeps_the_users_uri(tmp_path, monkeypatch):
    import mlflow

    from registry.tracking import setup_tracking

    uri = f"sqlite:///{tmp_path / 'users' / 'mlflow.db'}"
    monkeypatch.setenv("FER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(MLFLOW_TRACKING_ENV, uri)
    monkeypatch.delenv(MLFLOW_URI_SET_ENV, raising=False)
    # Each entry point builds its context anew: the second one still sees the user's URI.
    assert setup_tracking(Workspace.load()) == uri and setup_tracking(Workspace.load()) == uri
    assert mlflow.get_tracking_uri() == uri
