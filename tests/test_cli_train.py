"""`fer train` end to end on generated FER2013-format data: DVC version → trainer → MLflow run."""

from __future__ import annotations

import pytest
from pathlib import Path

from mlflow.tracking import MlflowClient

from fer_cli.main import main
from fer_core.errors import EXIT_STATE
from registry.tracking import setup_tracking

TINY = ["--set", "epochs=2", "--set", "max_steps_per_epoch=3", "--set", "batch_size=16",
        "--set", "model_kwargs.width=8"]


@pytest.mark.slow  # trains twice through the CLI (~15 s)
def test_fer_train_logs_a_complete_run_and_guards_reruns(workspace, tmp_path, capsys):
    main(["data", "synth", "fer2013", str(tmp_path / "src"), "--size", "140"])
    source = Path(capsys.readouterr().out.split("data to ")[1].split(" in ")[0])
    assert main(["data", "add", "fer", str(source), "--format", "fer2013"]) == 0
    capsys.readouterr()
    assert main(["train", "ca_resnet", "--data", "fer", *TINY]) == 0
    out = capsys.readouterr().out
    assert "mlflow run" in out and "test/accuracy" in out
    run_id = out.split("mlflow run")[1].split()[0]
    setup_tracking(workspace)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_kwargs.num_classes"] == "7" and run.data.tags["profile"] == "quick"
    assert run.data.tags["data_version"].startswith("fer@")
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png"}
    assert len(client.get_metric_history(run_id, "throughput/samples_per_s")) == 2

    # The same recipe on the same data again: refused without --resume, continued with it.
    assert main(["train", "ca_resnet", "--data", "fer", *TINY]) == EXIT_STATE  # a state conflict
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "ca_resnet", "--data", "fer", *TINY, "--resume"]) == 0


def test_fer_train_bad_input(workspace, capsys):
    assert main(["train", "nope", "--data", "x"]) == 2
    assert main(["train", "ca_resnet"]) == 2
    assert main(["train", "ca_resnet", "--data", "missing"]) == 2
    assert main(["train", "ca_resnet", "--data", "x", "--set", "lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("fer: error:") == 4
    assert main(["train", "--list"]) == 0
    assert "ca_resnet" in capsys.readouterr().out
