"""Dataset versions and gate results through DVC's and GX's own clients, and the store's
reliability under concurrency, ``kill -9`` and unknown versions (issues 11 items 7-8, 14).

Real git, real DVC (CLI and ``dvc.api``) with a local remote, real GX Core; ``fer`` runs as
subprocesses where processes race or die.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fer_cli.main import main
from fer_core.data.formats import get_format
from fer_platform.workspace import Workspace
from registry.datasets import DatasetStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # DVC remotes, git and GX in concurrent CLI subprocesses; tens of seconds each

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_", "MLFLOW_"))}
    return {**env, "FER_HOME": str(home), "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(home / "dvc-site")}


def _fer(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fer_cli", *args], env=_env(home), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sources")
    return [get_format("fer2013").write_synthetic(root / f"s{i}", size=140, seed=i) for i in range(4)]


def _add(name: str, source: Path) -> str:
    assert main(["data", "add", name, str(source), "--format", "fer2013"]) == 0
    return DatasetStore(Workspace.load()).get(name).version  # the workspace `fer` just used


def test_versions_are_git_tags_that_dvc_get_import_and_api_open_read_from_another_folder(workspace, sources,
                                                                                         tmp_path):
    import dvc.api

    v1, v2 = _add("fer", sources[0]), _add("fer", sources[1])
    repo = workspace.dvc_repo
    tags = subprocess.run(["git", "-C", str(repo), "tag", "-l"], capture_output=True, text=True).stdout.split()
    assert sorted(tags) == sorted([f"fer@{v1}", f"fer@{v2}"])
    shutil.rmtree(repo / ".dvc" / "cache")  # what follows must come from the remote
    other = tmp_path / "elsewhere"
    other.mkdir()
    env = _env(tmp_path / "client-home")
    run = lambda *a: subprocess.run(a, cwd=other, env=env, capture_output=True, text=True)  # noqa: E731
    got = run(DVC, "get", "--rev", f"fer@{v1}", str(repo), "datasets/fer", "-o", "v1")
    assert got.returncode == 0, got.stderr
    assert run("git", "init", "-q").returncode == 0 and run(DVC, "init", "-q").returncode == 0
    imp = run(DVC, "import", "--rev", f"fer@{v2}", str(repo), "datasets/fer", "-o", "v2")
    assert imp.returncode == 0, imp.stderr
    card = json.loads(dvc.api.read("datasets/fer/card.json", repo=str(repo), rev=f"fer@{v1}"))
    assert card["name"] == "fer"
    first = pd.read_parquet(other / "v1" / "manifest.parquet")
    second = pd.read_parquet(other / "v2" / "manifest.parquet")
    assert not first["content_hash"].equals(second["content_hash"])  # two different versions
    # The gate's per-sample table travels with the version.
    assert {"exists", "decodes", "height", "channels", "pixel_hash"} <= set(
        pd.read_parquet(other / "v1" / "gate.parquet").columns)
    assert "url" not in (repo / ".dvc" / "config").read_text()  # no frozen remote in the committed config


def test_a_moved_workspace_adds_and_pulls_against_its_own_remote(workspace, sources, tmp_path, monkeypatch):
    v1 = _add("fer", sources[0])
    moved = tmp_path / "moved-home"
    shutil.move(str(workspace.root), str(moved))
    monkeypatch.setenv("FER_HOME", str(moved))
    v2 = _add("fer", sources[1])
    assert not workspace.root.exists(), "the old workspace's remote was written to"
    objects = {p.name for p in (moved / "dvc-remote" / "files" / "md5").rglob("*.dir")}
    assert any(v2[2:] in o for o in objects)
    shutil.rmtree(moved / "data" / ".dvc" / "cache")
    assert main(["data", "pull", f"fer@{v1[:10]}"]) == 0
    assert DatasetStore(Workspace.load()).checked_out("fer") == v1


def test_the_saved_gx_checkpoint_reproduces_the_verdict_through_gx_api(workspace, sources, tmp_path, capsys):
    import great_expectations as gx

    from data_checks.gate import outcomes_of

    version = _add("fer", sources[0])
    capsys.readouterr()
    bad = tmp_path / "bad"
    shutil.copytree(sources[1], bad)
    csv = bad / "fer2013.csv"
    rows = csv.read_text().splitlines()
    rows[3] = "9" + rows[3][1:]  # a label outside 0..6: the adapter keeps it, the gate must refuse it
    csv.write_text("\n".join(rows) + "\n")
    assert main(["data", "add", "fer", str(bad), "--format", "fer2013"]) == 1
    failed_run = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gate run: ")][0]
    failed_name = failed_run.removeprefix("gate run: ")

    # The platform's runs are named after the version, on a real data asset.
    validations = list((workspace.gx_docs / "uncommitted" / "validations").rglob("*.json"))
    assert any(f"fer@{version}" in str(p) for p in validations)
    assert len(validations) == 2 and not any("__none__" in str(p) for p in validations), validations
    context = gx.get_context(mode="file", context_root_dir=str(workspace.gx_docs))
    passed = context.checkpoints.get(f"fer@{version}").run()
    assert passed.success
    failed = context.checkpoints.get(failed_name).run()
    assert not failed.success
    names = {o.name for o in outcomes_of(failed) if not o.success}
    assert names == {"label_in_domain"}, names
    assert all(o.success for o in outcomes_of(passed))
    results = list(passed.run_results.values())
    assert results[0].meta["active_batch_definition"]["data_asset_name"] == "fer"


def test_two_adds_of_one_name_at_once_both_version_their_own_data(workspace, sources):
    procs = [_fer(workspace.root, "data", "add", "fer", str(s), "--format", "fer2013") for s in sources[:2]]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    added = sorted(line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("added "))
    assert len(set(added)) == 2, added
    store = DatasetStore(workspace)
    assert sorted(v.ref for v in store.list("fer")) == added
    # Each version holds the data of the add that reported it.
    for out, _ in outs:
        ref = [line.split()[1] for line in out.splitlines() if line.startswith("added ")][0]
        root = store.pull("fer", ref.split("@")[1])
        meta = store.get("fer", ref.split("@")[1])
        assert Path(meta.source) in [s.resolve() for s in sources[:2]]
        manifest = pd.read_parquet(root / "manifest.parquet")
        assert len(manifest) == meta.num_samples


def test_four_adds_of_different_names_at_once_keep_the_gx_project_intact(workspace, sources):
    import great_expectations as gx

    procs = [_fer(workspace.root, "data", "add", f"d{i}", str(s), "--format", "fer2013")
             for i, s in enumerate(sources)]
    outs = [p.communicate(timeout=1200) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-500:] for o in outs]
    assert not any("Traceback" in err for _, err in outs)
    assert sorted(v.name for v in DatasetStore(workspace).list()) == ["d0", "d1", "d2", "d3"]
    context = gx.get_context(mode="file", context_root_dir=str(workspace.gx_docs))
    assert {c.name.split("@")[0] for c in context.checkpoints.all()} == {"d0", "d1", "d2", "d3"}


def _dvc_add_child(pid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid and any(c.endswith(b"dvc") for c in cmd) and b"add" in cmd:
            return True
    return False


def test_kill_9_during_dvc_add_leaves_the_old_version_usable(workspace, sources, capsys):
    old = _add("fer", sources[0])
    killed = False
    for _ in range(3):  # dvc add of 140 images is quick: retry until the kill lands inside it
        proc = _fer(workspace.root, "data", "add", "fer", str(sources[1]), "--format", "fer2013",
                    start_new_session=True)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if _dvc_add_child(proc.pid):
                time.sleep(0.3)  # into the add: dvc is hashing and writing the cache
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
        proc.communicate()
        if killed:
            break
        DatasetStore(workspace).pull("fer", old)  # it finished: put the old one back and retry
    assert killed, "never caught dvc add running"
    store = DatasetStore(workspace)
    assert [v.version for v in store.list("fer")] in ([old], [old, store.get("fer").version])
    # The next command rolls the interrupted add back and works; nothing is left in staging.
    assert main(["data", "pull", "fer"]) == 0 or main(["data", "pull", f"fer@{old}"]) == 0
    capsys.readouterr()
    assert main(["data", "pull", f"fer@{old}"]) == 0
    assert store.checked_out("fer") == old
    manifest = pd.read_parquet(store.path("fer") / "manifest.parquet")
    assert len(manifest) == store.get("fer", old).num_samples
    assert main(["data", "add", "fer", str(sources[2]), "--format", "fer2013"]) == 0
    assert not any((workspace.dvc_repo / "staging").iterdir())
    assert not (workspace.dvc_repo / ".pending" / "fer").exists()


def test_pull_of_an_unknown_version_changes_nothing_and_says_so(workspace, sources, capsys):
    version = _add("fer", sources[0])
    before = sorted(p.name for p in DatasetStore(workspace).path("fer").iterdir())
    capsys.readouterr()
    for ref in ("fer@" + "0" * 32, "fer@deadbeef"):
        assert main(["data", "pull", ref]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "nothing changed" in err, err
        assert DatasetStore(workspace).checked_out("fer") == version
        assert sorted(p.name for p in DatasetStore(workspace).path("fer").iterdir()) == before
