"""One settings object for the whole platform: environment variables over a YAML file over defaults.

Every setting has an environment variable ``FER_<NAME>`` (e.g. ``FER_TRACKING_URI``) and a key of
the same lower-case name in an optional YAML file named by ``FER_CONFIG``. Precedence is
environment > file > default, and the defaults are the embedded single-machine stack: everything
in the workspace ``$FER_HOME`` (default ``./.fer``), SQLite for MLflow, a local DVC remote, an
embedded Triton server, Prefect's ephemeral API, servers bound to 127.0.0.1.

Credentials never live here. MLflow, boto3/DVC and Prefect read their own environment variables
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``POSTGRES_PASSWORD`` ...), so a settings file that names a secret-looking key, or carries a
password inside a URI, is refused: such a file tends to get committed. A URI given through the
environment may carry a password (a direct ``postgresql://user:pw@host/db`` store needs one); it
is then masked in ``repr`` and in :meth:`Settings.redacted`, which is what callers should log.

This module is pure (stdlib + PyYAML): no MLflow, Prefect, DVC or Triton imports.

Example::

    settings = Settings.load()            # os.environ + $FER_CONFIG
    print(settings.redacted())            # safe to log
    settings.tracking_uri                 # 'sqlite:////abs/.fer/mlflow/mlflow.db' by default
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

ENV_PREFIX = "FER_"
CONFIG_ENV = "FER_CONFIG"
# MLflow's own variable is honoured below FER_TRACKING_URI and the config file. ``mlflow.set_tracking_uri``
# also writes it, so the platform records what it wrote in MLFLOW_URI_SET_ENV (inherited by child
# processes): a value equal to that one is the platform's own, not the user's, and is ignored.
MLFLOW_TRACKING_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_URI_SET_ENV = "FER_MLFLOW_URI_SET_BY_PLATFORM"
DEFAULT_HOME = ".fer"
DEFAULT_BIND_HOST = "127.0.0.1"
FACE_DETECTION_MODES = ("off", "haar")

# Keys that look like credentials (matched case-insensitively against settings-file keys).
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|credential|access[_-]?key|api[_-]?key|private[_-]?key|auth",
                         re.IGNORECASE)
# Object-store schemes accepted for artifact_root, dvc_remote and model_repository.
_STORE_SCHEMES = ("s3", "gs", "file")
_MASK = "***"
# Settings that may be local paths (a relative one in the settings file is relative to the file).
_PATH_SETTINGS = ("home", "artifact_root", "dvc_remote", "model_repository")

# The credential variables each kind of backend reads from the environment (documentation and
# `required_credentials`); their values are never read into the settings object.
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Per-machine serving performance variables (their meaning and defaults: serving.tuning). Read here,
# once, with the rest of the settings; the model repository gets them from the platform context.
# (tests/test_serving_tuning.py keeps this list equal to serving.tuning.ENV; fer_platform imports nothing of serving)
SERVING_TUNING_VARS = ("FER_TRITON_INSTANCES", "FER_TRITON_INTRA_OP_THREADS", "FER_TRITON_INTER_OP_THREADS",
                       "FER_TRITON_ALLOW_SPINNING", "FER_TRITON_QUEUE_DELAY_US", "FER_TRITON_PREFERRED_BATCH",
                       "FER_TRITON_PREPROCESS_INSTANCES", "FER_TRITON_POSTPROCESS_INSTANCES", "FER_TRITON_ENSEMBLE")


@dataclass(frozen=True)
class Settings:
    """Where the platform keeps its state and which servers it talks to.

    Build it with :meth:`load`; fields are plain strings (paths resolved to absolute) so the
    object is cheap to pass to subprocesses and flows.
    """

    home: Path
    """Workspace root (``FER_HOME``); all embedded state lives below it."""
    tracking_uri: str
    """MLflow tracking store or server (``FER_TRACKING_URI``); default the workspace's SQLite file."""
    registry_uri: str
    """MLflow model registry (``FER_REGISTRY_URI``); default = ``tracking_uri``."""
    artifact_root: str
    """Where MLflow artifacts go when the store is not a server (``FER_ARTIFACT_ROOT``): local dir or s3://."""
    dvc_remote: str
    """DVC remote of the dataset store (``FER_DVC_REMOTE``): local dir or s3://bucket/prefix."""
    triton_url: str
    """Triton HTTP endpoint (``FER_TRITON_URL``); empty = start the embedded server."""
    model_repository: str
    """Triton model repository (``FER_MODEL_REPOSITORY``): local dir or s3://bucket/prefix."""
    prefect_api_url: str
    """Prefect API (``FER_PREFECT_API_URL``); empty = Prefect's ephemeral local API."""
    bind_host: str
    """Interface our servers bind to (``FER_BIND_HOST``); 127.0.0.1 keeps them off the network."""
    s3_endpoint_url: str
    """S3 endpoint for an S3-compatible store such as MinIO (``FER_S3_ENDPOINT_URL``); empty = AWS."""
    face_detection: str = "off"
    """Face detection in the serving ensembles (``FER_FACE_DETECTION``): "off" = requests are face
    crops, resized like the training data (FER2013, AffectNet crops, DFEW clips); "haar" = detect,
    align and crop the largest face first (for full photos)."""
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """Names of the fields set by the environment or the file (the rest are defaults)."""
    config_file: Path | None = field(default=None, compare=False, repr=False)
    serving_tuning: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """The ``FER_TRITON_*`` serving performance variables set in the environment
    (:data:`SERVING_TUNING_VARS`), parsed and checked by ``serving.tuning.ServingTuning.load``."""

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: str | Path | None = None) -> "Settings":
        """Settings from ``env`` (default ``os.environ``) over the YAML ``config_file`` (default
        ``$FER_CONFIG``) over the embedded defaults. Empty environment values count as unset.

        Raises ``ValueError`` for an unknown or secret-looking key in the file, a password inside
        a URI in the file, or a malformed value.
        """
        env = os.environ if env is None else env
        names = setting_names()
        from_env = {name: env[ENV_PREFIX + name.upper()] for name in names if env.get(ENV_PREFIX + name.upper())}
        path = Path(config_file) if config_file else (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
        from_file = _read_config_file(path) if path is not None else {}
        base_dir = path.resolve().parent if path is not None else Path.cwd()

        def pick(name: str) -> str | None:
            if name in from_env:
                return from_env[name]
            if name in from_file:  # relative paths in a file are relative to the file
                value = from_file[name]
                return _absolutize(value, base_dir) if name in _PATH_SETTINGS else value
            return None

        home = Path(pick("home") or DEFAULT_HOME).expanduser().resolve()
        mlflow_uri = env.get(MLFLOW_TRACKING_ENV, "")
        if mlflow_uri and mlflow_uri != env.get(MLFLOW_URI_SET_ENV) and "tracking_uri" not in from_env \
                and "tracking_uri" not in from_file:
            from_env["tracking_uri"] = mlflow_uri  # the user's MLFLOW_TRACKING_URI: lowest explicit precedence
        tracking = pick("tracking_uri") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        values = {
            "home": home,
            "tracking_uri": tracking,
            "registry_uri": pick("registry_uri") or tracking,
            "artifact_root": _store_location(pick("artifact_root") or str(home / "mlflow" / "artifacts")),
            "dvc_remote": _store_location(pick("dvc_remote") or str(home / "dvc-remote")),
            "triton_url": pick("triton_url") or "",
            "model_repository": _store_location(pick("model_repository") or str(home / "triton" / "models")),
            "prefect_api_url": pick("prefect_api_url") or "",
            "bind_host": pick("bind_host") or DEFAULT_BIND_HOST,
            "s3_endpoint_url": pick("s3_endpoint_url") or "",
            "face_detection": pick("face_detection") or "off",
        }
        tuning = {name: env[name] for name in SERVING_TUNING_VARS if env.get(name, "").strip()}
        settings = cls(**values, explicit=frozenset(from_env) | frozenset(from_file), config_file=path,
                       serving_tuning=tuning)
        settings._validate()
        return settings

    def _validate(self) -> None:
        if self.face_detection not in FACE_DETECTION_MODES:
            raise ValueError(f"face_detection must be one of {FACE_DETECTION_MODES}, got {self.face_detection!r}")
        for name in ("tracking_uri", "registry_uri"):
            uri = getattr(self, name)
            if "://" not in uri and not Path(uri).is_absolute():
                raise ValueError(f"{name} {uri!r} must be a URI (sqlite:///, postgresql://, http(s)://) "
                                 "or an absolute path")
        for name in ("prefect_api_url", "s3_endpoint_url"):
            url = getattr(self, name)
            if url and urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{name} {url!r} must be an http:// or https:// URL (or empty)")
        if self.triton_url and urlsplit(self.triton_url if "://" in self.triton_url else f"//{self.triton_url}").port is None:
            raise ValueError(f"triton_url {self.triton_url!r} must name a port, e.g. http://triton:8000 or localhost:8000")
        if not self.bind_host or any(c.isspace() for c in self.bind_host):
            raise ValueError(f"bind_host {self.bind_host!r} must be a host name or IP address")

    # -- queries -----------------------------------------------------------------------------
    def is_set(self, name: str) -> bool:
        """True when ``name`` came from the environment or the settings file, not the default."""
        if name not in setting_names():
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(setting_names())}")
        return name in self.explicit

    @property
    def embedded(self) -> bool:
        """True when nothing points at a remote service (the single-machine default)."""
        return (self.tracking_uri.startswith("sqlite:") and not self.triton_url and not self.prefect_api_url
                and not any(is_remote(v) for v in (self.artifact_root, self.dvc_remote, self.model_repository)))

    def required_credentials(self) -> tuple[str, ...]:
        """Environment variables the configured backends read credentials from (names only).

        S3 locations need the AWS pair (unless the host provides a role); an MLflow server behind
        basic-auth needs the MLflow pair. Whether they are set is the caller's business.
        """
        needed: list[str] = []
        if any(v.startswith("s3://") for v in (self.artifact_root, self.dvc_remote, self.model_repository)):
            needed += S3_CREDENTIALS
        if urlsplit(self.tracking_uri).scheme in ("http", "https"):
            needed += MLFLOW_CREDENTIALS
        return tuple(needed)

    def redacted(self) -> dict[str, str]:
        """All settings as strings with any password inside a URI masked: safe to log or to
        record as run parameters."""
        return {name: redact_uri(str(getattr(self, name))) for name in setting_names()}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"

    __str__ = __repr__


def setting_names() -> tuple[str, ...]:
    """Names of the settings (the YAML keys; ``FER_<NAME>`` in the environment)."""
    return tuple(f.name for f in dataclasses.fields(Settings) if f.name not in ("explicit", "config_file", "serving_tuning"))


def env_var(name: str) -> str:
    """The environment variable of setting ``name``, e.g. ``tracking_uri`` → ``FER_TRACKING_URI``."""
    if name not in setting_names():
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(setting_names())}")
    return ENV_PREFIX + name.upper()


def is_remote(location: str) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``), false for a local path or ``file://``."""
    scheme = urlsplit(location).scheme if "://" in location else ""
    return scheme not in ("", "file")


def redact_uri(value: str) -> str:
    """``scheme://user:secret@host/...`` → ``scheme://user:***@host/...``; other text unchanged."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{_MASK}@{hostinfo}"))


# -- helpers ------------------------------------------------------------------------------------
def _read_config_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ValueError(f"settings file {path} (from ${CONFIG_ENV}) does not exist")
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"settings file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"settings file {path} must be a mapping of setting: value")
    secret_keys = sorted(str(k) for k in data if _SECRET_KEY.search(str(k)))
    if secret_keys:
        raise ValueError(
            f"settings file {path} contains secret-looking key(s) {secret_keys}: credentials are read from "
            "the environment only (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME/"
            "MLFLOW_TRACKING_PASSWORD, POSTGRES_PASSWORD ...); remove them from the file"
        )
    names = setting_names()
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ValueError(f"settings file {path}: unknown key(s) {unknown}; known: {', '.join(names)}")
    values: dict[str, str] = {}
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            raise ValueError(f"settings file {path}: {key} must be a single value, not {type(value).__name__}")
        text = str(value)
        if "://" in text and urlsplit(text).password is not None:
            raise ValueError(
                f"settings file {path}: {key} carries a password inside its URI; give the URI without it and "
                f"the password through the environment (or set {ENV_PREFIX}{key.upper()} in the environment)"
            )
        values[key] = text
    return values


def _absolutize(value: str, base_dir: Path) -> str:
    # Only plain relative paths are rebased; URIs and absolute paths are kept as they are.
    if "://" in value or value.startswith(("/", "~")):
        return value
    return str(base_dir / value)


def _store_location(value: str) -> str:
    """A local directory (made absolute) or an object-store URI of a supported scheme."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in _STORE_SCHEMES:
            raise ValueError(f"storage location {value!r}: scheme must be one of {_STORE_SCHEMES} or a local path")
        if parts.scheme != "file" and not parts.netloc:
            raise ValueError(f"storage location {value!r} must name a bucket, e.g. s3://bucket/prefix")
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())
