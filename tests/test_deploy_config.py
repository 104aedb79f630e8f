"""The production stack's configuration, checked statically (no Docker engine is needed or used).

docker/compose.yaml, docker/compose.gpu.yaml, the Dockerfiles, .env.example and prefect.yaml must
agree with each other and with the code: files and build contexts exist, every variable is listed,
every service is health-checked and restarted, only the intended services publish ports (on the
configurable, loopback-by-default host), and every command they run is one the project has.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
PREFECT_YAML = ROOT / "prefect.yaml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# The services that run all the time, and the only ones allowed to publish ports (container ports).
LONG_RUNNING = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "triton"}
PUBLISHED = {"mlflow": {5000}, "prefect-server": {4200}, "triton": {8000, 8001}}
PLATFORM_IMAGE_DIR = "/opt/fer"  # WORKDIR of docker/Dockerfile, where the repository is copied
# The flows of prefect.yaml (owned by flows/), exactly these entrypoints.
FLOW_ENTRYPOINTS = {
    "flows/ingest.py:ingest", "flows/train.py:train", "flows/refine_au_labels.py:au_noisy_rounds",
    "flows/promote.py:promote", "flows/retrain_all.py:retrain_all", "flows/protocols.py:loso",
    "flows/protocols.py:loso_fold",
}
# FER_* variables that configure the stack or its worker script rather than fer_platform.settings.
STACK_VARIABLES = {"FER_IMAGE", "FER_TORCH_TARGET", "FER_PUBLISH_HOST", "FER_TRITON_IMAGE", "FER_WORK_POOL",
                   "FER_WORKER_CONCURRENCY", "FER_WORKER_GPUS", "FER_TRITON_GPUS"}

_COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${VAR}, ${VAR:-x}, ${VAR:?msg}
_CONTAINER_VAR = re.compile(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)")  # $${VAR}: expanded in the container


def _compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def _services() -> dict:
    return _compose()["services"]


def _env_example() -> tuple[set[str], set[str]]:
    """(variables set in .env.example, variables only mentioned in a comment)."""
    active, commented = set(), set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.match(r"^([A-Z][A-Z0-9_]*)=", line):
            active.add(m.group(1))
        elif m := re.match(r"^#\s*([A-Z][A-Z0-9_]*)=", line):
            commented.add(m.group(1))
    return active, commented


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _uses_platform_image(service: dict) -> bool:
    return service.get("build", {}).get("dockerfile") == "docker/Dockerfile"


# -- structure --------------------------------------------------------------------------------------
def test_compose_has_the_stack_services():
    services = _services()
    assert LONG_RUNNING <= set(services)
    extra = {name for name in set(services) - LONG_RUNNING if not services[name].get("profiles")}
    assert not extra, f"services outside a profile that are not part of the stack: {extra}"


def test_every_service_has_a_healthcheck_and_a_restart_policy():
    for name, service in _services().items():
        assert "restart" in service, f"{name}: no restart policy"
        assert "healthcheck" in service, f"{name}: no healthcheck"
        if service.get("profiles"):  # hand-started tools may opt out explicitly
            continue
        assert service["restart"] in {"always", "unless-stopped", "on-failure"}, f"{name}: restart {service['restart']!r}"
        check = service["healthcheck"]
        assert not check.get("disable") and check.get("test"), f"{name}: healthcheck disabled or empty"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test must be CMD or CMD-SHELL"


def test_only_the_public_services_publish_ports_on_the_configured_host():
    for name, service in _services().items():
        ports = service.get("ports", [])
        assert service.get("network_mode") != "host", f"{name}: host networking bypasses the port policy"
        if name not in PUBLISHED:
            assert not ports and not service.get("expose"), f"{name} must stay internal, publishes {ports}"
            continue
        container_ports = set()
        for spec in ports:
            assert isinstance(spec, str), f"{name}: write ports as HOST:HOST_PORT:CONTAINER_PORT strings"
            host, _, container = spec.rpartition(":")
            # the bind address is always given, and it is the configurable loopback-by-default host
            assert host.startswith("${FER_PUBLISH_HOST:-127.0.0.1}:"), f"{name}: {spec} not bound to FER_PUBLISH_HOST"
            container_ports.add(int(container))
        assert container_ports == PUBLISHED[name], f"{name} publishes {container_ports}"
    active, _ = _env_example()
    assert "FER_PUBLISH_HOST=127.0.0.1" in ENV_EXAMPLE.read_text().splitlines()
    assert "FER_PUBLISH_HOST" in active


def test_every_compose_variable_is_listed_in_env_example():
    active, _ = _env_example()
    used = set()
    for path in (COMPOSE, COMPOSE_GPU):
        used |= set(_COMPOSE_VAR.findall(path.read_text()))
    missing = sorted(used - active)
    assert not missing, f".env.example lacks {missing}"


def test_variables_expanded_inside_containers_are_set_for_them():
    for name, service in _services().items():
        text = yaml.safe_dump({k: service.get(k) for k in ("command", "entrypoint", "healthcheck")})
        needed = set(_CONTAINER_VAR.findall(text))
        missing = needed - set(_environment(service))
        assert not missing, f"{name} expands {missing} but does not set them"


def test_every_setting_is_listed_in_env_example_and_fer_variables_are_real_settings():
    from fer_platform.settings import env_var, setting_names

    active, commented = _env_example()
    settings_vars = {env_var(n) for n in setting_names()} | {"FER_CONFIG"}
    assert settings_vars <= active | commented, f".env.example lacks {sorted(settings_vars - active - commented)}"
    for name, service in _services().items():
        for key in _environment(service):
            if key.startswith("FER_"):
                assert key in settings_vars | STACK_VARIABLES, f"{name}: {key} is no setting (typo?)"


def test_referenced_files_and_build_contexts_exist():
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in _compose(path)["services"].items():
            build = service.get("build")
            if build:
                context = (DOCKER / build["context"]).resolve()
                assert context.is_dir(), f"{name}: build context {context} missing"
                assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
            for volume in service.get("volumes", []):
                source = volume.split(":", 1)[0]
                if source.startswith((".", "/")):
                    assert (DOCKER / source).exists(), f"{name}: bind-mount source {source} missing"
            # scripts of the platform image are the repository's files copied to /opt/fer
            text = yaml.safe_dump(service)
            for script in re.findall(re.escape(PLATFORM_IMAGE_DIR) + r"/([\w./-]+\.(?:sh|py))", text):
                assert (ROOT / script).is_file(), f"{name}: {script} is not in the repository"
    for name in GPU_SERVICES():
        assert name in _services(), f"compose.gpu.yaml overrides unknown service {name}"


def GPU_SERVICES() -> set[str]:  # noqa: N802 - read like a constant, computed from the file
    return set(_compose(COMPOSE_GPU)["services"])


def test_gpu_override_reserves_nvidia_gpus_for_the_worker_and_triton():
    for name in ("worker", "triton"):
        devices = _compose(COMPOSE_GPU)["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for service in _services().values():  # a GPU reservation in the base file breaks CPU-only hosts
        assert "deploy" not in service


# -- images -----------------------------------------------------------------------------------------
def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_platform_dockerfile_targets_cpu_and_cuda_runs_fer_as_non_root_without_secrets():
    instructions = _dockerfile_instructions(DOCKER / "Dockerfile")
    text = (DOCKER / "Dockerfile").read_text()
    assert ("ARG", "TORCH_TARGET=cpu") in instructions
    assert "cuda)" in text and "cpu)" in text  # both build targets are handled
    assert "-c requirements/constraints.txt" in text
    assert ("ENTRYPOINT", '["fer"]') == [i for i in instructions if i[0] == "ENTRYPOINT"][-1]
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user not in {"root", "0"}
    for word, rest in instructions:
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*\s*=", rest, re.I), f"secret in {word} {rest}"
        if word in {"COPY", "ADD"}:
            *sources, _ = rest.split()
            for source in sources:
                assert ".env" not in source.split("/"), "the .env file must never be copied into the image"
                assert (ROOT / source).exists(), f"COPY source {source} missing"


def test_triton_runs_nvidias_container_with_explicit_model_control():
    instructions = _dockerfile_instructions(DOCKER / "triton.Dockerfile")
    bases = [rest for word, rest in instructions if word == "FROM"]
    # the argv scrubber's compiler stage and the server: both NVIDIA's image
    assert bases[0] == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS scrubber"
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\$\{TRITON_TAG\}-py3", bases[-1])
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from="):
            assert (ROOT / rest.split()[0]).exists()
    # The fused ensemble layout (the KIND_CPU default) runs the champion inside its Python stub.
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install .*\bonnxruntime\b", runs), "the stub's Python needs onnxruntime"
    triton = _services()["triton"]
    assert _as_list(triton["entrypoint"])[-1] == "/opt/fer/docker/scripts/triton.sh"
    assert "TRITON_MODEL_REPOSITORY" in _environment(triton)
    script = (ROOT / "docker/scripts/triton.sh").read_text()
    assert "exec tritonserver" in script and "--model-control-mode=explicit" in script
    assert '--model-repository="$REPO"' in script and "TRITON_MODEL_REPOSITORY" in script
    # model control only with the platform's key (serving.server's header and restricted APIs)
    from serving.server import CONTROL_HEADER, RESTRICTED_APIS

    assert f"HEADER={CONTROL_HEADER}" in script
    assert f'--grpc-restricted-protocol="{",".join(RESTRICTED_APIS)}:$HEADER=$key"' in script
    # ... which never appears in argv: the preload fills the placeholder in from the key file
    from serving.server import KEY_PLACEHOLDER

    assert f"key={KEY_PLACEHOLDER}" in script and 'export FER_TRITON_KEY_FILE="$KEY_FILE"' in script
    library = re.search(r'SCRUBBER="\$\{FER_TRITON_SCRUBBER:-([^}]+)\}"', script).group(1)
    for dockerfile in ("triton.Dockerfile", "triton-local.Dockerfile"):
        steps = [f"{word} {rest}" for word, rest in _dockerfile_instructions(DOCKER / dockerfile)]
        assert "COPY serving/backends/scrub_argv.c /src/scrub_argv.c" in steps
        assert "RUN gcc -shared -fPIC -O2 -o /src/libferscrub.so /src/scrub_argv.c" in steps
        assert f"COPY --from=scrubber /src/libferscrub.so {library}" in steps


def _first_party_closure(start: str) -> set[str]:
    """Top-level first-party packages that ``start``'s modules import, followed through first-party code."""
    roots = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    seen: set[Path] = set()
    found: set[str] = set()
    queue = list((ROOT / start).rglob("*.py"))
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                if name.split(".")[0] not in roots:
                    continue
                found.add(name.split(".")[0])
                target = ROOT.joinpath(*name.split("."))
                queue += [target / "__init__.py"] if target.is_dir() else [target.with_suffix(".py")]
    return {r for r in found if (ROOT / r).is_dir()}


def test_triton_images_copy_every_package_the_serving_code_imports():
    # The fer_platform move once broke the Triton image build (ModuleNotFoundError in its RUN step),
    # found only by make stack-test: a static check catches it in the fast lane.
    needed = _first_party_closure("serving") - {"serving"} | {"serving"}
    assert {"fer_core", "fer_platform"} <= needed
    for dockerfile in ("triton.Dockerfile", "triton-local.Dockerfile"):
        copied = {rest.split()[0].rstrip("/") for word, rest in _dockerfile_instructions(DOCKER / dockerfile)
                  if word == "COPY" and not rest.startswith("--")}
        missing = sorted(needed - copied)
        assert not missing, f"{dockerfile} does not COPY {missing}"


def _compose_with_tags(path: Path) -> dict:
    """A compose file that uses Compose's merge tags (!reset, !override), read with plain YAML."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, tagged)
    return yaml.load(path.read_text(), Loader=Loader)


def test_local_override_puts_every_service_on_the_host_network_on_loopback():
    local = _compose_with_tags(DOCKER / "compose.local.yaml")
    assert set(local["services"]) == set(_services())
    for name, service in local["services"].items():
        assert service["network_mode"] == "host", name
        assert service["networks"] == [] and service["ports"] == [], name
        assert service["image"].endswith(":${FER_LOCAL_TAG:-local}"), f"{name} must run an image of make images-local"
    text = (DOCKER / "compose.local.yaml").read_text()
    assert "0.0.0.0" not in text
    assert local["services"]["mlflow"]["environment"]["MLFLOW_HOST"] == "127.0.0.1"
    assert local["services"]["triton"]["environment"]["TRITON_ADDRESS"] == "127.0.0.1"


def test_mlflow_server_runs_on_postgres_and_s3_with_basic_auth():
    script = (ROOT / "docker/scripts/mlflow-server.sh").read_text()
    assert "--app-name basic-auth" in script
    assert 'db_uri() { echo "postgresql://' in script
    assert "--artifacts-destination" in script and "--serve-artifacts" in script
    env = _environment(_services()["mlflow"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in env and "POSTGRES_PASSWORD" in env


def test_prefect_server_and_worker_use_postgres_and_the_work_pool():
    server = _environment(_services()["prefect-server"])
    assert server["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert server["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    worker = _environment(_services()["worker"])
    assert worker["PREFECT_API_URL"] == worker["FER_PREFECT_API_URL"] == "http://prefect-server:4200/api"
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert pools == {"fer-training"}
    assert "${FER_WORK_POOL:-fer-training}" in (COMPOSE.read_text())


# -- commands ---------------------------------------------------------------------------------------
def _fer_parser():
    from fer_cli.main import build_parser

    return build_parser()


def _subcommands(parser) -> dict:
    import argparse

    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _fer_commands_in_compose() -> list[list[str]]:
    commands = []
    for name, service in _services().items():
        if _uses_platform_image(service) and "entrypoint" not in service:
            commands.append(_as_list(service.get("command")))
    return commands


def test_compose_fer_commands_parse_with_the_real_cli():
    parser = _fer_parser()
    commands = _fer_commands_in_compose()
    assert ["serve", "--url", "http://triton:8000"] in commands
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"`fer {' '.join(argv)}` (docker/compose.yaml) is rejected by fer's parser ({exc})")


def test_overridden_entrypoints_are_tools_the_image_installs():
    allowed = {"prefect": "prefect", "mlflow": "mlflow"}  # console scripts of requirements/platform.txt
    platform = (ROOT / "requirements" / "platform.txt").read_text().split()
    for name, service in _services().items():
        if not _uses_platform_image(service) or "entrypoint" not in service:
            continue
        entry = _as_list(service["entrypoint"])
        if entry[0] == "/bin/sh":
            assert entry[1].startswith(PLATFORM_IMAGE_DIR + "/docker/scripts/")
        else:
            assert entry[0] in allowed and allowed[entry[0]] in platform, f"{name}: unknown entrypoint {entry}"


@pytest.mark.slow  # runs the prefect CLI in subprocesses (~15 s)
def test_worker_script_uses_prefect_commands_that_exist():
    import subprocess
    import sys

    prefect = Path(sys.executable).with_name("prefect")
    script = (ROOT / "docker/scripts/worker.sh").read_text()
    commands = set()
    for line in re.findall(r"(?:^|\|\||&&|exec)\s*prefect\s+([^|&>\n]+)", script, re.M):
        words = [w for w in shlex.split(line.replace("\\", "")) if not w.startswith("-")]
        commands.add(tuple(words[:2]))
    assert {("work-pool", "inspect"), ("work-pool", "create"), ("deploy",), ("worker", "start")} <= {
        c[:2] if c[0] != "deploy" else c[:1] for c in commands}
    for command in sorted(commands):
        command = command[:1] if command[0] == "deploy" else command
        proc = subprocess.run([str(prefect), *command, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"`prefect {' '.join(command)}` does not exist: {proc.stderr[-300:]}"


def test_fer_commands_in_the_deployment_guide_exist():
    """Every `fer <command> [<sub-command>]` the guide tells people to run is in the CLI (``fer
    serve``, ``fer infer``, ``fer promote`` and ``fer pipeline`` come from other modules)."""
    top = _subcommands(_fer_parser())
    text = DEPLOYMENT_DOC.read_text()
    referenced = set()
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # join continued lines
            words = shlex.split(line.split("#", 1)[0]) if line.strip() else []
            for i, word in enumerate(words):
                if word == "fer" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    referenced.add(tuple(words[i + 1:i + 3]))
                elif word == "cli" and i > 0 and words[i - 1] == "--rm" and i + 1 < len(words):
                    referenced.add(tuple(words[i + 1:i + 3]))
    assert {"promote", "pipeline", "serve", "infer"} <= {r[0] for r in referenced}
    for command in referenced:
        assert command[0] in top, f"docs/deployment.md uses `fer {command[0]}`, which fer does not have"
        subs = _subcommands(top[command[0]])
        if subs and len(command) > 1 and not command[1].startswith("-"):
            assert command[1] in subs, f"docs/deployment.md uses `fer {' '.join(command)}`"


# -- prefect.yaml -----------------------------------------------------------------------------------
def test_prefect_yaml_is_valid_for_prefect_and_deploys_every_flow():
    # Prefect's own model of prefect.yaml (what `prefect deploy` validates against).
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert {d.entrypoint for d in model.deployments} == FLOW_ENTRYPOINTS
    scheduled = {d.entrypoint: d.schedules for d in model.deployments if d.schedules}
    assert list(scheduled) == ["flows/retrain_all.py:retrain_all"]
    (schedule,) = scheduled["flows/retrain_all.py:retrain_all"]
    assert schedule.cron == "0 3 * * *"
    # no hard-coded checkout: the worker's FER_CHECKOUT, read when the run starts; the image sets it
    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert pull[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $FER_CHECKOUT }}"
    assert PLATFORM_IMAGE_DIR not in PREFECT_YAML.read_text()
    assert f"FER_CHECKOUT={PLATFORM_IMAGE_DIR}" in (DOCKER / "Dockerfile").read_text()


@pytest.mark.parametrize("entrypoint", sorted(FLOW_ENTRYPOINTS))
def test_prefect_entrypoints_are_flows_in_the_repository(entrypoint):
    path, _, function = entrypoint.partition(":")
    source = ROOT / path
    assert source.is_file(), f"{path} does not exist (prefect.yaml deploys {entrypoint})"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
            assert decorators & {"flow", "prefect.flow"}, f"{entrypoint} is not decorated with @flow"
            return
    pytest.fail(f"{path} defines no top-level function {function}")
