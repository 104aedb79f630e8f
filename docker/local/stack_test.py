"""`make stack-test`: the production stack (docker/compose.yaml + docker/compose.local.yaml) end to end.

Slow (minutes) and needs a Docker engine (docker/local/engine.sh) and the images of
`make images-local`, so it is not part of `make test`. Each step prints what it checked; the first
failed check stops the run with exit 1 (the stack is left up for inspection unless it passed,
``--keep`` leaves it up anyway). Steps:

 1. fresh state: ``down -v`` of the test project, a private env file with random credentials;
 2. ``up -d --wait``: every service healthy (timed);
 3. basic-auth: MLflow and Prefect refuse requests without credentials (401);
 4. SynthFACS data written into the worker's FER_HOME volume, then ``retrain_all`` for ca_resnet
    (tiny recipe overrides) as a run of the ``retrain-all`` deployment, submitted from the host and
    executed by the worker container;
 5. MLflow (PostgreSQL-backed) has the run, the registered version and the ``champion`` alias; the
    run's artifacts are in the S3 service; the dataset is in the DVC remote there; the champion is
    loaded in the Triton container; a face image is sent from the host through the ensemble with
    ``fer infer --url``; the process table: the Triton control key and this run's credentials are in
    no process's command line (``/proc/<pid>/cmdline``, readable by every user of the host) and not
    in ``docker inspect``; tritonserver carries the key placeholder, which Triton refuses as a key;
 6. ``down`` (volumes kept) and ``up`` again: runs, versions, aliases and the served champion are the
    same, inference still answers, the process table is checked again;
 7. no secret in any image: ``docker history``, the image config and every layer are scanned for the
    credentials of this run and for the build host's CA certificates that the image does not ship.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's packages (serving.server), not an installed copy
PROJECT = "fer-stack-test"
COMPOSE = ["docker", "compose", "-p", PROJECT, "-f", str(ROOT / "docker/compose.yaml"),
           "-f", str(ROOT / "docker/compose.local.yaml")]
IMAGES = ("fer-platform:local", "fer-triton:local", "fer-postgres:local", "fer-s3-standin:local")
PORTS = {"mlflow": 15000, "prefect": 14200, "s3": 19000, "triton_grpc": 18001, "triton_http": 18000}
NETWORK = "ca_resnet"
DATA_FORMAT, DATA_SIZE = "fer2013", 140
# The recipe and gates of tests/test_flows.py: a tiny model that trains in seconds on a shared CPU.
OVERRIDES = {NETWORK: {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16, "model_kwargs.width": 8}}
GATES = {NETWORK: {"floor": 0.0, "latency_budget_ms": 2000.0, "smoke_samples": 4, "latency_requests": 5}}
DEPLOYMENT = "retrain_all/retrain-all"


class CheckFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def ok(text: str) -> None:
    print(f"   ok  {text}", flush=True)


def check(condition: bool, text: str) -> None:
    if not condition:
        raise CheckFailed(text)
    ok(text)


def run(cmd: list[str], env: dict | None = None, timeout: float = 900, check_rc: bool = True,
        quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check_rc and proc.returncode != 0:
        raise CheckFailed(f"`{' '.join(cmd[:8])} ...` exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    if not quiet and proc.stdout.strip():
        print("   | " + proc.stdout.strip().replace("\n", "\n   | ")[-3000:], flush=True)
    return proc


def write_env_file(folder: Path) -> dict[str, str]:
    """Random credentials for this run, in an env file only the caller can read (never in the repo)."""
    values = {
        "POSTGRES_USER": "fer",
        "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
        "MINIO_ROOT_USER": "fer-s3",
        "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(18),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(18),
        "PREFECT_API_AUTH_STRING": f"admin:{secrets.token_urlsafe(18)}",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    path = folder / "stack.env"
    path.touch(mode=0o600)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    values["_path"] = str(path)
    return values


def compose(creds: dict, *args: str, timeout: float = 900, quiet: bool = False, check_rc: bool = True):
    return run([*COMPOSE, "--env-file", creds["_path"], *args], timeout=timeout, quiet=quiet, check_rc=check_rc)


def up(creds: dict) -> float:
    start = time.monotonic()
    proc = compose(creds, "up", "-d", "--wait", "--wait-timeout", "900", timeout=1000, check_rc=False, quiet=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        compose(creds, "ps", "-a", check_rc=False)
        raise CheckFailed(f"`compose up --wait` failed after {seconds:.0f} s: {proc.stderr[-2000:]}")
    ps = compose(creds, "ps", "-a", "--format", "json", quiet=True).stdout
    rows = [json.loads(line) for line in ps.splitlines() if line.strip()] if not ps.lstrip().startswith("[") \
        else json.loads(ps)
    for row in rows:
        print(f"   | {row['Service']:<15} {row['State']:<8} {row.get('Health', '') or row.get('Status', '')}")
    return seconds


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def host_env(creds: dict, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_", "MLFLOW_", "PREFECT_", "AWS_"))}
    env.update({
        "PYTHONPATH": str(ROOT), "FER_HOME": str(home),
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
        "PREFECT_API_URL": f"http://127.0.0.1:{PORTS['prefect']}/api",
        "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
        "AWS_ACCESS_KEY_ID": creds["MINIO_ROOT_USER"], "AWS_SECRET_ACCESS_KEY": creds["MINIO_ROOT_PASSWORD"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    })
    return env


def snapshot(env: dict[str, str]) -> dict:
    """What must survive a restart: MLflow runs, versions and aliases, Triton's served version."""
    code = f"""
import json, mlflow, tritonclient.grpc as g
from registry.models import registered_name
name = registered_name("{NETWORK}")
c = mlflow.MlflowClient("http://127.0.0.1:{PORTS['mlflow']}")
runs = sorted(r.info.run_id for e in c.search_experiments() for r in c.search_runs([e.experiment_id]))
versions = {{m.name: sorted(int(v.version) for v in c.search_model_versions(f"name='{{m.name}}'"))
            for m in c.search_registered_models()}}
aliases = {{m.name: m.aliases for m in c.search_registered_models()}}
champion = c.get_model_version_by_alias(name, "champion")
run = c.get_run(champion.run_id)
t = g.InferenceServerClient("127.0.0.1:{PORTS['triton_grpc']}")
served = sorted(int(v) for v in t.get_model_metadata("{NETWORK}").versions)
print(json.dumps({{"model": name, "runs": runs, "versions": versions, "aliases": aliases, "champion": champion.version,
                  "champion_run": champion.run_id, "artifact_uri": run.info.artifact_uri,
                  "ensemble_ready": t.is_model_ready("{NETWORK}_ensemble"), "served": served}}))
"""
    out = run([sys.executable, "-c", code], env=env, timeout=120, quiet=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def s3_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    code = f"""
import boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:{PORTS['s3']}")
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="{bucket}", Prefix="{prefix}")
        for o in p.get("Contents", [])]
print("\\n".join(keys))
"""
    return [k for k in run([sys.executable, "-c", code], env=env, timeout=120, quiet=True).stdout.splitlines() if k]


def infer(env: dict[str, str], image: Path) -> str:
    proc = run([sys.executable, "-m", "fer_cli", "infer", "--url", f"grpc://127.0.0.1:{PORTS['triton_grpc']}",
                "--network", NETWORK, "--json", str(image)], env=env, timeout=180, quiet=True)
    return proc.stdout.strip()


def scan_process_table(creds: dict) -> None:
    """The Triton control key and this run's credentials in no command line of any process of the
    host (containers included: every local user can read ``/proc/<pid>/cmdline``) and not in
    ``docker inspect`` of the containers; the key reaches tritonserver through its key file
    (docker/scripts/triton.sh, serving/backends/scrub_argv.c), and its placeholder is no key."""
    from serving.server import CONTROL_HEADER, KEY_PLACEHOLDER

    key = compose(creds, "exec", "-T", "worker", "cat", "/srv/fer/triton/control.key", quiet=True).stdout.strip()
    check(len(key) >= 32, f"the worker's control key read ({len(key)} characters)")
    needles = {"Triton control key": key.encode()}
    needles.update({f"credential {k}": v.encode() for k, v in creds.items() if not k.startswith("_") and len(v) > 8})
    needles["credential Prefect password"] = creds["PREFECT_API_AUTH_STRING"].partition(":")[2].encode()
    found, scanned, in_containers, tritons = [], 0, 0, []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            contained = b"docker" in (proc / "cgroup").read_bytes()
        except OSError:  # ended meanwhile
            continue
        scanned += 1
        in_containers += contained
        program = cmdline.split(b"\0")[0].decode(errors="replace")
        if program.endswith("tritonserver") and contained:
            tritons.append(cmdline)
        found += [f"{name} in pid {proc.name} ({program})" for name, value in needles.items() if value in cmdline]
    check(not found, f"no secret in the command line of any of {scanned} processes ({in_containers} in containers) "
                     f"{found[:5] if found else ''}")
    check(len(tritons) == 1 and tritons[0].count(f"{CONTROL_HEADER}={KEY_PLACEHOLDER}\0".encode()) == 2,
          f"tritonserver's restricted-API options carry {KEY_PLACEHOLDER}, not the key")
    ids = compose(creds, "ps", "-q", quiet=True).stdout.split()
    inspect = run(["docker", "inspect", *ids], quiet=True).stdout
    check(key not in inspect, f"the key in no `docker inspect` of the {len(ids)} containers")
    index = f"http://127.0.0.1:{PORTS['triton_http']}/v2/repository/index"
    for name, value, expected in (("no key", None, 403), ("the placeholder", KEY_PLACEHOLDER, 403),
                                  ("the key", key, 200)):
        request = urllib.request.Request(index, data=b"{}", method="POST")
        if value is not None:
            request.add_header(CONTROL_HEADER, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        check(status == expected, f"Triton's model index with {name}: {status}")


def scan_images(creds: dict) -> None:
    """No credential of this run and no CA certificate of the build host (that the image does not
    ship itself) in `docker history`, the image config, or any file of any layer."""
    ca_path = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    host_certs = set(re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END", Path(ca_path).read_text(), re.S)) \
        if Path(ca_path).is_file() else set()
    needles = {f"credential {k}": v.encode() for k, v in creds.items() if not k.startswith("_") and len(v) > 8}
    for image in IMAGES:
        own = run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "cat", image,
                   "/etc/ssl/certs/ca-certificates.crt"], check_rc=False, quiet=True).stdout
        # The build host's own CAs (a TLS proxy's), i.e. its local additions to the system bundle
        # (update-ca-certificates' /usr/local/share/ca-certificates); public CAs are no secret.
        local = "".join(p.read_text() for p in Path("/usr/local/share/ca-certificates").rglob("*.crt"))
        foreign = [c for c in host_certs if c in local and c not in own]
        # one long base64 line from the middle of each foreign certificate identifies it
        marks = {f"build-host CA #{i}": c.splitlines()[len(c.splitlines()) // 2].encode() for i, c in enumerate(foreign)}
        patterns = {**needles, **marks, "pip cert path": b"/run/secrets/ca\x00"}
        history = run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image], quiet=True).stdout
        config = run(["docker", "image", "inspect", image], quiet=True).stdout
        for name, needle in patterns.items():
            if needle.decode(errors="ignore") in history + config:
                raise CheckFailed(f"{image}: {name} in docker history / image config")
        user = json.loads(config)[0]["Config"].get("User", "")
        check(user not in ("", "root", "0") and not user.startswith("0:"), f"{image} runs as non-root user {user!r}")
        found = []
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            archive = Path(tmp) / "image.tar"
            run(["docker", "save", "-o", str(archive), image], timeout=900, quiet=True)
            with tarfile.open(archive) as outer:
                for member in outer:
                    if not member.name.endswith("layer.tar"):
                        continue
                    with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                        for entry in layer:
                            if entry.name.startswith(("run/secrets/", "wheels/")) and entry.isfile():
                                found.append(f"{entry.name} in a layer")
                            if not entry.isfile() or entry.size > 64 << 20:
                                continue
                            data = layer.extractfile(entry).read()
                            for name, needle in patterns.items():
                                if needle in data:
                                    found.append(f"{name} in {entry.name}")
        check(not found, f"{image}: no credential, no build-host CA ({len(marks)} foreign certs checked), "
                         f"no build mount in any layer {found[:5] if found else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--skip-scan", action="store_true", help="skip the (slow) image scan")
    parser.add_argument("--reuse", metavar="ENV_FILE", help="debugging: keep the running stack of an earlier "
                        "run (its env file) instead of starting from empty volumes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fer-stack-test-"))
    if args.reuse:
        creds = dict(line.split("=", 1) for line in Path(args.reuse).read_text().splitlines() if "=" in line)
        creds["_path"] = args.reuse
    else:
        creds = write_env_file(work)
    env = host_env(creds, work / "fer-home")
    passed = False
    timings: dict[str, float] = {}
    try:
        step("engine and images")
        run(["docker", "version", "--format", "server {{.Server.Version}}"])
        run(["docker", "compose", "version"])
        for image in IMAGES:
            size = run(["docker", "image", "inspect", "--format", "{{.Size}}", image], quiet=True).stdout.strip()
            ok(f"{image} {int(size) / 1e6:.0f} MB")

        step("fresh state: down -v, then up -d --wait")
        if not args.reuse:
            compose(creds, "down", "-v", "--remove-orphans", quiet=True)
        timings["first up (empty volumes) s"] = up(creds)
        ok(f"every service healthy in {timings['first up (empty volumes) s']:.0f} s")
        networks = run(["docker", "network", "ls", "--format", "{{.Name}} {{.Driver}}"], quiet=True).stdout.split("\n")
        check(not any(line.endswith(("bridge", "overlay")) and PROJECT in line for line in networks),
              "no bridge or overlay network created (host network only)")

        step("basic-auth refuses requests without credentials")
        mlflow_api = f"http://127.0.0.1:{PORTS['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
        # (Prefect leaves /api/health open, for health checks: an API route is asked instead)
        prefect_api = f"http://127.0.0.1:{PORTS['prefect']}/api/admin/version"
        check(http_status(mlflow_api) == 401, "MLflow without credentials: 401")
        check(http_status(mlflow_api, ("admin", "wrong")) == 401, "MLflow with a wrong password: 401")
        check(http_status(mlflow_api, ("admin", creds["MLFLOW_TRACKING_PASSWORD"])) == 200, "MLflow with them: 200")
        check(http_status(prefect_api) == 401, "Prefect without credentials: 401")
        user, _, password = creds["PREFECT_API_AUTH_STRING"].partition(":")
        check(http_status(prefect_api, (user, password)) == 200, "Prefect with them: 200")

        step(f"data: SynthFACS {DATA_FORMAT} into the worker's FER_HOME")
        compose(creds, "exec", "-T", "worker", "fer", "data", "synth", DATA_FORMAT,
                f"/srv/fer/sources/{DATA_FORMAT}", "--size", str(DATA_SIZE), "--seed", "0")

        step(f"retrain_all for {NETWORK}: a run of {DEPLOYMENT}, picked up by the worker container")
        code = f"""
import json
from prefect.deployments import run_deployment
run = run_deployment({DEPLOYMENT!r}, parameters={{"networks": [{NETWORK!r}], "overrides": {json.dumps(OVERRIDES)},
                     "gates": {json.dumps(GATES)}, "dispatch": "local"}}, timeout=1800, poll_interval=5)
print(json.dumps({{"id": str(run.id), "state": run.state.type.value, "message": run.state.message or "",
                  "worker": run.infrastructure_pid or ""}}))
"""
        start = time.monotonic()
        out = run([sys.executable, "-c", code], env=env, timeout=2000, quiet=True).stdout
        timings["retrain_all deployment run s"] = time.monotonic() - start
        result = json.loads(out.strip().splitlines()[-1])
        print(f"   | flow run {result['id']}: {result['state']} {result['message']}")
        logs = compose(creds, "logs", "--no-color", "--tail", "60", "worker", quiet=True).stdout
        check(result["id"].split("-")[0] in logs or "retrain" in logs, "the worker container's log shows the run")
        if result["state"] != "COMPLETED":
            print("   | " + logs[-4000:].replace("\n", "\n   | "))
        check(result["state"] == "COMPLETED", f"flow run COMPLETED in {timings['retrain_all deployment run s']:.0f} s")

        step("MLflow (PostgreSQL), S3 artifacts, DVC remote, Triton container, inference from the host")
        first = snapshot(env)
        print(f"   | {json.dumps(first)}")
        check(len(first["runs"]) >= 1 and first["champion_run"] in first["runs"], "the training run is in MLflow")
        check("champion" in first["aliases"].get(first["model"], {}), f"{first['model']}@champion = v{first['champion']}")
        rows = compose(creds, "exec", "-T", "postgres", "sh", "-c",
                       'PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d mlflow'
                       ' -tAc "select count(*) from runs; select count(*) from model_versions;"', quiet=True).stdout.split()
        check(int(rows[0]) == len(first["runs"]) and int(rows[1]) >= 1,
              f"PostgreSQL database mlflow holds them ({rows[0]} runs, {rows[1]} model versions)")
        keys = s3_keys(env, "mlflow")
        check(any(first["champion_run"] in k for k in keys) or any("models/" in k for k in keys),
              f"artifacts in s3://mlflow ({len(keys)} objects, e.g. {keys[:2]})")
        dvc = s3_keys(env, "dvc", "fer/")
        check(len(dvc) > 0, f"dataset in the DVC remote s3://dvc/fer ({len(dvc)} objects)")
        check(first["ensemble_ready"] and int(first["champion"]) in first["served"],
              f"Triton container serves {NETWORK} v{first['champion']} (ready: {NETWORK}_ensemble)")
        faces = work / "faces"
        run([sys.executable, "-m", "fer_cli", "data", "synth", DATA_FORMAT, str(faces), "--size", "20", "--seed", "7"],
            env=env, quiet=True)
        # one face of the generated FER2013 CSV (48x48 grey pixels), as the PNG file a user would send
        image = work / "face.png"
        run([sys.executable, "-c", "import csv, sys, numpy, PIL.Image; f = next(csv.DictReader(open(sys.argv[1])));"
             " PIL.Image.fromarray(numpy.array(f['pixels'].split(), dtype=numpy.uint8).reshape(48, 48)).save(sys.argv[2])",
             str(faces / "fer2013.csv"), str(image)], env=env, quiet=True)
        answer = infer(env, image)
        print(f"   | {answer[:300]}")
        check('"label"' in answer or '"expression"' in answer or "probab" in answer,
              f"fer infer --url from the host answered for {image.name}")

        step("no secret in the process table (the Triton control key, the credentials)")
        scan_process_table(creds)

        step("down (volumes kept) and up again: everything is still there")
        start = time.monotonic()
        compose(creds, "down", quiet=True)
        timings["down s"] = time.monotonic() - start
        timings["second up (existing volumes) s"] = up(creds)
        ok(f"healthy again in {timings['second up (existing volumes) s']:.0f} s")
        # Triton starts empty (explicit model control): the worker's start reloads the champions?
        # If not, the served check below fails, which is the point of it.
        deadline = time.monotonic() + 180
        while True:
            try:
                second = snapshot(env)
                if second["ensemble_ready"] or time.monotonic() > deadline:
                    break
            except CheckFailed:
                if time.monotonic() > deadline:
                    raise
            time.sleep(5)
        print(f"   | {json.dumps(second)}")
        for key in ("runs", "versions", "aliases", "champion", "artifact_uri"):
            check(second[key] == first[key], f"{key} unchanged")
        check(second["ensemble_ready"] and second["served"] == first["served"],
              f"Triton serves v{second['served']} again")
        check(infer(env, image) == answer, "the same answer for the same image")
        scan_process_table(creds)

        if not args.skip_scan:
            step("no secret in any image")
            start = time.monotonic()
            scan_images(creds)
            timings["image scan s"] = time.monotonic() - start
        passed = True
    except (CheckFailed, subprocess.TimeoutExpired, StopIteration, KeyError, ValueError) as exc:
        print(f"\nFAILED: {type(exc).__name__}: {exc}", flush=True)
    finally:
        print("\ntimings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
        if passed and not args.keep:
            compose(creds, "down", quiet=True, check_rc=False)
            print(f"stack down (volumes of project {PROJECT} kept; `docker compose -p {PROJECT} down -v` drops them)")
        else:
            print(f"stack left up: docker compose -p {PROJECT} -f docker/compose.yaml -f docker/compose.local.yaml "
                  f"--env-file {creds['_path']} ps")
    print("\nstack test: " + ("1 passed, 0 failed" if passed else "0 passed, 1 failed"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
