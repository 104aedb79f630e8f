"""A full disk loses nothing and claims nothing (issue 11, item 9), on a real full file system.

The disk is a small tmpfs mounted for the test (needs root; skipped otherwise): writes fail with a
real ``ENOSPC`` from the kernel, nothing is injected.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fer_core.training.callbacks import Callback
from fer_core.training.checkpoint import load_checkpoint
from fer_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from training_toy import ToyTask, toy_recipe  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs; yields (mount point, fill(), free())."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    filler = mount / "filler"

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * ((1 << 16) if os.statvfs(mount).f_bavail > 64 else 4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.statvfs(mount).f_bavail == 0

    def free() -> None:
        filler.unlink(missing_ok=True)

    try:
        yield mount, fill, free
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class _FillAfterEpoch(Callback):
    def __init__(self, epoch: int, fill) -> None:
        self.epoch, self.fill = epoch, fill

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            self.fill()


def test_disk_full_while_writing_best_then_resume_never_claims_lost_best_weights(small_disk):
    mount, fill, free = small_disk
    run = mount / "run"
    # train/loss improves every epoch, so epoch 2 must write best.pt: that write hits the full disk.
    recipe = toy_recipe(epochs=3, monitor="train/loss", monitor_mode="min")
    with pytest.raises(OSError) as info:
        Trainer(recipe, ToyTask(), run, callbacks=[_FillAfterEpoch(0, fill)]).fit()
    assert info.value.errno == errno.ENOSPC
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name], "temporaries left on the full disk"
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == 1 and last["best_epoch"] == 0  # nothing claims epoch 2
    free()
    result = Trainer(recipe, ToyTask(), run).fit(resume=True)
    best = load_checkpoint(run / "best.pt")
    # The summary's best epoch is the epoch whose weights best.pt holds.
    assert best["epoch"] == result.best_epoch + 1
    assert result.best_checkpoint == run / "best.pt"


def test_without_best_pt_the_summary_says_last_epoch_weights(tmp_path, capsys):
    from fer_cli.train import _print_summary

    run = tmp_path / "run"
    Trainer(toy_recipe(epochs=2), ToyTask(), run).fit()
    (run / "best.pt").unlink()  # lost (e.g. the disk was full when it was due)
    result = Trainer(toy_recipe(epochs=2), ToyTask(), run).fit(resume=True)
    assert result.best_epoch == -1
    _print_summary("toy_net", "toy@x", result, None, run)
    out = capsys.readouterr().out
    assert "none (no best.pt" in out and "(best)" not in out
    assert [line for line in out.splitlines() if "checkpoint" in line][0].endswith("last.pt")


def test_disk_full_never_truncates_the_gx_project_config(small_disk):
    import data_checks  # noqa: F401  (installs the atomic writes into GX's modules)
    import great_expectations as gx

    mount, fill, free = small_disk
    project = mount / "gx"
    context = gx.get_context(mode="file", context_root_dir=str(project))
    context.data_sources.add_pandas(name="before")
    config = project / "great_expectations.yml"
    before = config.read_text()
    fill()
    with pytest.raises(OSError) as info:
        for i in range(50):  # GX rewrites the whole config on each change; one of them meets the full disk
            context.data_sources.add_pandas(name=f"while_full_{i}")
    assert info.value.errno == errno.ENOSPC
    after = config.read_text()
    assert after == before or "while_full_" in after  # a complete file: the old one or a newer whole one
    free()
    reopened = gx.get_context(mode="file", context_root_dir=str(project))
    assert "before" in [d.name for d in reopened.data_sources.all().values()]
    assert not [p for p in project.iterdir() if p.name.endswith(".tmp")]


def test_fer_data_add_on_a_full_disk_says_so_in_one_line_and_works_once_freed(small_disk, monkeypatch, capsys):
    from fer_cli.main import main
    from fer_core.data.formats import get_format

    mount, fill, free = small_disk
    source = get_format("fer2013").write_synthetic(mount.parent / "src", size=60)
    monkeypatch.setenv("FER_HOME", str(mount / "home"))
    for var in ("FER_DVC_REMOTE", "FER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    assert main(["data", "add", "fer", str(source), "--format", "fer2013"]) == 0
    config = mount / "home" / "gx" / "great_expectations.yml"
    before = config.read_text()
    capsys.readouterr()
    fill()
    other = get_format("fer2013").write_synthetic(mount.parent / "src2", size=60, seed=5)
    assert main(["data", "add", "fer", str(other), "--format", "fer2013"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert config.read_text() == before
    free()
    assert main(["data", "add", "fer", str(other), "--format", "fer2013"]) == 0
