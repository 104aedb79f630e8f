"""magnifier pre-training: magnified-pairs format, the magnifier network and task, weights into micro_lsh."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fer_core.data import formats
from fer_core.data.manifest import read_card, read_manifest
from fer_core.models import create_model
from fer_core.models.micro_lsh import magnifier_input
from fer_core.training.tasks import create_task, get_recipe
from fer_core.training.tasks.magnifier import reconstruction_errors
from fer_core.training.tasks.micro import load_pretrained_magnifier
from fer_core.training.trainer import Trainer
from tests.model_checks import check_onnx_export


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    src = formats.get_format("magnified_pairs").write_synthetic(tmp / "src", size=48, image_size=32, num_subjects=6)
    formats.adapt("magnified_pairs", src, tmp / "prepared", name="pairs", test_subjects=["s00"])
    return tmp / "prepared"


def _recipe(**overrides):
    return get_recipe("magnifier", "quick").with_overrides({"device": "cpu", **overrides})


def test_pairs_format_writes_three_frame_clips_with_alpha(pairs_root, tmp_path):
    card, manifest = read_card(pairs_root), read_manifest(pairs_root)
    assert card.task == "micro" and card.source_format == "magnified_pairs" and len(manifest) == 48
    assert (manifest["num_frames"] == 3).all() and (manifest[["onset", "apex", "offset"]] == [0, 1, 2]).all().all()
    assert manifest["magnification"].between(1.0, 13.0).all()
    assert set(manifest.loc[manifest["split"] == "test", "subject"]) == {"s00"}
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"id": ["a"], "subject": ["s"], "alpha": ["x"]}).to_csv(tmp_path / "bad" / "pairs.csv", index=False)
    with pytest.raises(ValueError, match="alpha"):
        formats.adapt("magnified_pairs", tmp_path / "bad", tmp_path / "out", name="bad")


def test_reconstruction_errors_by_hand():
    onset = torch.zeros(1, 1, 1, 2)
    apex = torch.tensor([[[[0.1, 0.2]]]])
    target = torch.tensor([[[[0.3, 0.5]]]])
    factor = torch.tensor([2.0])
    pred = torch.tensor([[[[0.3, 0.4]]]])
    got = reconstruction_errors(pred, {"magnified": target, "onset": onset, "apex": apex, "factor": factor})
    assert got["mse"] == pytest.approx(0.01 / 2)  # (0, 0.1)^2 averaged
    assert got["mse_identity"] == pytest.approx((0.04 + 0.09) / 2)  # apex vs target
    assert got["mse_linear"] == pytest.approx((0.01 + 0.01) / 2)  # 0 + 2 * apex = (0.2, 0.4)
    assert got["gain_vs_linear"] == pytest.approx(1 - 0.005 / 0.01)


def test_magnifier_network_reads_the_factor_plane_and_exports(tmp_path):
    net = create_model("magnifier", img_size=16, magnifier_width=4).eval()
    onset, apex = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    factors = torch.tensor([2.0, 9.5])
    with torch.no_grad():
        got = net(magnifier_input(onset, apex, factors))
        torch.testing.assert_close(got, net.magnifier.magnify(onset, apex, factors))
    assert net.metadata.input.shape == (3, 3, 16, 16) and net.metadata.output_names == ("magnified",)
    assert check_onnx_export(net, tmp_path) <= 1e-4


def test_task_trains_and_its_weights_load_into_micro_lsh(pairs_root, tmp_path):
    recipe = _recipe(epochs=1, max_steps_per_epoch=2)
    task = create_task("magnifier", pairs_root, recipe)
    result = Trainer(recipe, task, tmp_path / "run").fit()
    assert {"test/mse", "test/mse_identity", "test/mse_linear"} <= set(result.test_metrics)
    micro = create_model("micro_lsh", img_size=32, width=4, stem="small", magnifier_width=8, num_mag_frames=4,
                         head_hidden=8, freeze_magnifier=True)
    load_pretrained_magnifier(micro, str(result.best_checkpoint))
    trained = create_model("magnifier", **recipe.model_kwargs)
    trained.load_state_dict(torch.load(result.best_checkpoint, weights_only=True)["model_state"])
    for (name, a), (_, b) in zip(micro.magnifier.state_dict().items(), trained.magnifier.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert all(not p.requires_grad for p in micro.magnifier.parameters())  # frozen: a recipe choice
    wrong_width = create_model("micro_lsh", img_size=32, width=4, stem="small", magnifier_width=4, num_mag_frames=4)
    with pytest.raises(ValueError, match="magnifier_width"):
        load_pretrained_magnifier(wrong_width, str(result.best_checkpoint))
    with pytest.raises(ValueError, match="registry URI"):
        load_pretrained_magnifier(micro, "models:/fer-magnifier/1")


def test_task_refuses_data_without_pairs(tmp_path):
    src = formats.get_format("casme2").write_synthetic(tmp_path / "src", size=6, image_size=32)
    formats.adapt("casme2", src, tmp_path / "prepared", name="c")
    with pytest.raises(ValueError, match="magnified"):
        create_task("magnifier", tmp_path / "prepared", _recipe())


@pytest.mark.slow
def test_pretrained_magnifier_beats_linear_magnification_on_held_out_pairs(tmp_path):
    src = formats.get_format("magnified_pairs").write_synthetic(tmp_path / "src", size=200, image_size=32,
                                                                 num_subjects=10, seed=3)
    formats.adapt("magnified_pairs", src, tmp_path / "prepared", name="pairs")
    recipe = _recipe(epochs=6)
    result = Trainer(recipe, create_task("magnifier", tmp_path / "prepared", recipe), tmp_path / "run").fit()
    metrics = result.test_metrics
    assert metrics["test/mse"] < 0.5 * metrics["test/mse_linear"], metrics


def test_registry_uri_parsing_for_weight_references():
    from registry.models import parse_model_uri

    assert parse_model_uri("models:/fer-magnifier/3") == ("magnifier", 3, None)
    assert parse_model_uri("models:/fer-magnifier@champion") == ("magnifier", None, "champion")
    for bad in ("models:/other/3", "models:/fer-magnifier/x", "/tmp/best.pt"):
        with pytest.raises(ValueError):
            parse_model_uri(bad)
