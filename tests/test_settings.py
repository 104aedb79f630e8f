"""The settings object: embedded defaults, env > file > default precedence, secret refusal, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fer_platform.settings import Settings, env_var, redact_uri, setting_names


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_nothing_set_gives_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.load(env={})
    home = (tmp_path / ".fer").resolve()
    assert s.home == home
    assert s.tracking_uri == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert s.registry_uri == s.tracking_uri
    assert s.artifact_root == str(home / "mlflow" / "artifacts")
    assert s.dvc_remote == str(home / "dvc-remote")
    assert s.model_repository == str(home / "triton" / "models")
    assert (s.triton_url, s.prefect_api_url, s.s3_endpoint_url) == ("", "", "")
    assert s.bind_host == "127.0.0.1"
    assert s.embedded and not s.explicit and s.required_credentials() == ()


def test_defaults_follow_the_workspace(tmp_path):
    from fer_platform.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    s = Settings.load(env={"FER_HOME": str(ws.root)})
    assert s.home == ws.root.resolve()
    assert s.tracking_uri == f"sqlite:///{ws.mlflow_db}"
    assert s.dvc_remote == str(ws.dvc_remote) and s.model_repository == str(ws.triton_repository)
    assert s.artifact_root == str(ws.mlflow_artifacts)


def test_env_beats_file_beats_default(tmp_path):
    config = _write(tmp_path / "fer.yaml", {
        "tracking_uri": "http://mlflow.file:5000", "triton_url": "http://triton.file:8000",
        "dvc_remote": "s3://file-bucket/dvc", "home": "state",
    })
    env = {"FER_CONFIG": str(config), "FER_TRACKING_URI": "postgresql://mlflow@db.env:5432/mlflow",
           "FER_BIND_HOST": "0.0.0.0"}
    s = Settings.load(env=env)
    assert s.tracking_uri == "postgresql://mlflow@db.env:5432/mlflow"  # env over file
    assert s.triton_url == "http://triton.file:8000"  # file over default
    assert s.dvc_remote == "s3://file-bucket/dvc"
    assert s.bind_host == "0.0.0.0"  # env over default
    assert s.home == (tmp_path / "state").resolve()  # relative to the file, not the cwd
    assert s.registry_uri == s.tracking_uri  # the registry follows the tracking store by default
    assert s.prefect_api_url == ""  # untouched default
    assert s.is_set("tracking_uri") and s.is_set("triton_url") and not s.is_set("prefect_api_url")
    assert not s.embedded
    # an explicit config_file argument wins over $FER_CONFIG
    other = _write(tmp_path / "other.yaml", {"triton_url": "localhost:9000"})
    assert Settings.load(env=env, config_file=other).triton_url == "localhost:9000"


def test_empty_environment_values_count_as_unset(tmp_path):
    config = _write(tmp_path / "fer.yaml", {"triton_url": "http://triton:8000"})
    s = Settings.load(env={"FER_CONFIG": str(config), "FER_TRITON_URL": ""})
    assert s.triton_url == "http://triton:8000"


def test_every_setting_has_its_fer_variable(tmp_path):
    values = {
        "home": str(tmp_path / "h"), "tracking_uri": "http://mlflow:5000", "registry_uri": "http://registry:5000",
        "artifact_root": "s3://mlflow/artifacts", "dvc_remote": "s3://dvc/store", "triton_url": "http://triton:8000",
        "model_repository": "s3://triton/models", "prefect_api_url": "http://prefect:4200/api",
        "bind_host": "0.0.0.0", "s3_endpoint_url": "http://minio:9000", "face_detection": "haar",
    }
    assert set(values) == set(setting_names())
    s = Settings.load(env={env_var(k): v for k, v in values.items()})
    assert {k: str(getattr(s, k)) for k in values} == values
    assert s.required_credentials() == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def test_settings_are_frozen():
    s = Settings.load(env={})
    with pytest.raises(AttributeError):
        s.tracking_uri = "http://elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize("key", ["password", "aws_secret_access_key", "MLFLOW_TRACKING_PASSWORD", "api_token",
                                 "aws_access_key_id", "postgres_password"])
def test_a_settings_file_with_a_secret_looking_key_is_refused(tmp_path, key):
    config = _write(tmp_path / "fer.yaml", {"tracking_uri": "http://mlflow:5000", key: "hunter2"})
    with pytest.raises(ValueError, match="secret-looking") as info:
        Settings.load(env={"FER_CONFIG": str(config)})
    assert "hunter2" not in str(info.value)  # the refusal itself must not leak the secret


def test_a_password_inside_a_uri_in_the_file_is_refused(tmp_path):
    config = _write(tmp_path / "fer.yaml", {"tracking_uri": "postgresql://mlflow:hunter2@db:5432/mlflow"})
    with pytest.raises(ValueError, match="password inside its URI") as info:
        Settings.load(env={"FER_CONFIG": str(config)})
    assert "hunter2" not in str(info.value)


def test_a_uri_password_from_the_environment_is_kept_but_never_shown():
    s = Settings.load(env={"FER_TRACKING_URI": "postgresql://mlflow:hunter2@db:5432/mlflow"})
    assert s.tracking_uri == "postgresql://mlflow:hunter2@db:5432/mlflow"  # SQLAlchemy needs it
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert "hunter2" not in str(s.redacted())
    assert s.redacted()["tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"


def test_credentials_in_the_environment_never_reach_the_object(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-pw-value")
    monkeypatch.setenv("FER_DVC_REMOTE", "s3://bucket/dvc")
    s = Settings.load()
    text = repr(s) + str(s.redacted()) + str(vars(s))
    assert "s3cr3t-value" not in text and "mlflow-pw-value" not in text


@pytest.mark.parametrize("content, message", [
    ("- just\n- a list\n", "mapping"),
    ("tracking_uri: [a, b]\n", "single value"),
    ("trackin_uri: sqlite:///x.db\n", "unknown key"),
    ("tracking_uri: relative/store\n", "absolute path"),
    ("prefect_api_url: prefect:4200\n", "http"),
    ("dvc_remote: ftp://host/x\n", "scheme"),
    ("model_repository: s3:///no-bucket\n", "bucket"),
    ("triton_url: http://triton\n", "port"),
    ("tracking_uri: [unclosed\n", "YAML"),
])
def test_malformed_settings_are_refused_with_a_clear_error(tmp_path, content, message):
    config = tmp_path / "fer.yaml"
    config.write_text(content)
    with pytest.raises(ValueError, match=message):
        Settings.load(env={"FER_CONFIG": str(config)})


def test_a_missing_settings_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Settings.load(env={"FER_CONFIG": str(tmp_path / "nope.yaml")})


def test_redact_uri_masks_only_passwords():
    assert redact_uri("https://user:pw@host:1/x?y=1") == "https://user:***@host:1/x?y=1"
    assert redact_uri("postgresql://user@host/db") == "postgresql://user@host/db"
    assert redact_uri("/plain/path") == "/plain/path"


def test_the_library_reads_its_configuration_from_the_settings_file(tmp_path, monkeypatch):
    """registry.tracking and registry.datasets follow $FER_CONFIG, not only FER_* variables."""
    from fer_platform.workspace import Workspace
    from registry.datasets import DatasetStore
    from registry.tracking import tracking_uri

    for name in setting_names():
        monkeypatch.delenv(env_var(name), raising=False)
    config = _write(tmp_path / "fer.yaml", {"home": "ws", "dvc_remote": "s3://bucket/dvc"})
    monkeypatch.setenv("FER_CONFIG", str(config))
    workspace = Workspace.load()  # what an entry point builds
    assert tracking_uri(workspace) == f"sqlite:///{(tmp_path / 'ws' / 'mlflow' / 'mlflow.db').resolve()}"
    store = DatasetStore(workspace)
    assert store.workspace.root == (tmp_path / "ws").resolve() and store.remote_url == "s3://bucket/dvc"


def test_face_detection_mode_is_validated():
    assert Settings.load(env={}).face_detection == "off"
    with pytest.raises(ValueError, match="face_detection"):
        Settings.load(env={"FER_FACE_DETECTION": "dlib"})


def test_promote_rollback_and_models_take_triton_url_from_the_config_file(workspace, tmp_path, monkeypatch, capsys):
    """``fer models/promote/rollback`` use the settings' ``triton_url`` (env, else ``$FER_CONFIG``),
    not only ``$FER_TRITON_URL``: with the file naming a Triton (none listens there), `fer models`
    asks that one and says it is unreachable (EXIT_SERVICE) instead of reporting the repository."""
    from fer_cli.main import main
    from serving.server import free_port

    url = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("FER_CONFIG", str(_write(tmp_path / "fer.yaml", {"triton_url": url})))
    assert main(["models"]) == 5
    assert f"Triton at grpc://{url} is unreachable" in capsys.readouterr().err
    monkeypatch.setenv("FER_TRITON_URL", "127.0.0.1:1")  # the environment wins over the file
    assert main(["models"]) == 5
    assert "Triton at grpc://127.0.0.1:1 is unreachable" in capsys.readouterr().err

    monkeypatch.delenv("FER_TRITON_URL")
    monkeypatch.setenv("FER_CONFIG", str(_write(tmp_path / "bad.yaml", {"triton_url": "triton-without-port"})))
    assert main(["rollback", "ca_resnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "triton_url" in err[0] and "port" in err[0], err


def test_the_workspace_is_the_context_an_entry_point_builds(tmp_path, monkeypatch):
    """``Workspace.load()`` reads the environment and $FER_CONFIG once; ``Workspace(root)`` reads nothing."""
    from fer_platform.workspace import Workspace

    monkeypatch.setenv("FER_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("FER_TRITON_URL", "http://triton.env:8000")
    loaded = Workspace.load()
    assert loaded.root == (tmp_path / "env-home").resolve() and loaded.settings.triton_url == "http://triton.env:8000"
    plain = Workspace(tmp_path / "plain")
    assert plain.settings.triton_url == "" and plain.settings.home == (tmp_path / "plain").resolve()
    assert plain.settings.tracking_uri == f"sqlite:///{plain.mlflow_db}"
    with pytest.raises(ValueError, match="differs"):
        Workspace(tmp_path / "a", Settings.load(env={"FER_HOME": str(tmp_path / "b")}))


def test_model_repository_names_the_folder_or_triton_s3_location(tmp_path):
    """FER_MODEL_REPOSITORY: a local folder is the repository itself; ``s3://bucket/prefix`` is what
    Triton reads (in its own URL form for a non-AWS endpoint), published from the working copy."""
    from fer_platform.workspace import Workspace
    from serving.repository import ModelRepository
    from serving.s3_repository import triton_location

    home = str(tmp_path / "home")
    local = Workspace.load(env={"FER_HOME": home, "FER_MODEL_REPOSITORY": str(tmp_path / "repo")})
    assert local.triton_repository == (tmp_path / "repo").resolve()
    repo = ModelRepository.of_workspace(local)
    assert repo.root == (tmp_path / "repo").resolve() and repo.mirror is None and repo.triton_location == str(repo.root)
    assert Workspace(tmp_path / "home").triton_repository == (tmp_path / "home" / "triton" / "models").resolve()

    on_s3 = Workspace.load(env={"FER_HOME": home, "FER_MODEL_REPOSITORY": "s3://models-bucket/fer/",
                                "FER_S3_ENDPOINT_URL": "http://minio:9000", "FER_FACE_DETECTION": "haar"})
    assert on_s3.triton_repository == on_s3.root / "triton" / "models"  # the working copy
    repo = ModelRepository.of_workspace(on_s3)
    assert repo.triton_location == "s3://http://minio:9000/models-bucket/fer" and repo.face_detection == "haar"
    assert triton_location("s3://b/p") == "s3://b/p"  # AWS itself: Triton's plain form
    assert triton_location("s3://b", "https://s3.example.com") == "s3://https://s3.example.com:443/b"
    assert triton_location("/srv/models", "http://minio:9000") == "/srv/models"
