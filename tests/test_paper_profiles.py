"""The ``paper`` profiles are the source methods' hyper-parameters (issue 16), value by value, and
``fer train NETWORK --profile paper --print-recipe`` shows them. Where a method leaves a value open,
the choice is recorded in the network file's profile comment; those values are checked too, so a
change to them is a visible decision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from fer_core.models import create_model
from fer_core.training.tasks import get_recipe
from fer_core.training.tasks.dynamic import EcStflOptions


def test_ca_resnet_paper_is_the_method_recipe():
    r = get_recipe("ca_resnet", "paper")
    assert (r.epochs, r.scheduler, r.step_size, r.gamma) == (300, "hold_decay_cosine", 50, 0.9)
    assert dict(r.loss_kwargs) == {"form": "method", "gamma": 2.0, "alpha": 0.25, "reduction": "sum",
                                   "label_smoothing": 0.1}
    a = r.augment
    assert a["hflip"] and a["vflip"]  # flip and mirror
    assert a["gamma"] == 2.0 and a["gamma_max"] == 1.0  # gamma 2, not a drawn range
    assert a["erase_prob"] > 0 and a["noise_var"] == 0.001
    assert list(a["rotation_range"]) == [30.0, 90.0] and a["rotation_deg"] == 0.0
    assert list(a["crop_area"]) == [0.5, 1.0]
    assert (r.early_stopping_patience, r.monitor) == (10, "val/loss")


def test_micro_lsh_paper_is_the_method():
    r = get_recipe("micro_lsh", "paper")
    m = r.model_kwargs
    assert m["magnifier"] == "learned" and m["freeze_magnifier"] is True
    assert m["num_mag_frames"] == 32 and list(m["alpha_range"]) == [1.0, 13.0]
    assert m["shared_qk"] is False and m["attn_dim"] == 1024 and m["n_rounds"] > 2
    assert r.data["magnifier_weights"] == "models:/fer-magnifier@champion"
    assert r.data["face_crop"] is True and r.data["min_class_clips"] == 10
    model = create_model("micro_lsh", **m)
    assert model.attention.k_proj is not None  # separate W_Q and W_K
    # factor 1 + alpha, alpha in (1, 13] in 32 steps of 0.375 (the source's ambiguity and our reading
    # are in fer_core/models/micro_lsh.py's docstring)
    assert len(model.factors) == 32 and float(model.factors[0]) == 2.375 and float(model.factors[-1]) == 14.0


def test_au_cotrain_paper_is_the_method():
    r = get_recipe("au_cotrain", "paper")
    assert r.loss_kwargs["bce"] == "au_weighted" and r.loss_kwargs["orthogonality"] == "signed"
    assert r.data["align_faces"] is True
    a = r.augment
    assert a["hflip"] and a["greyscale_prob"] > 0
    assert list(a["crop_area"]) == [(224 / 256) ** 2] * 2 and list(a["crop_ratio"]) == [1.0, 1.0]
    assert a["rotation_deg"] == 0.0 and a["gamma_max"] == 1.0 and a["noise_var"] == 0.0  # nothing extra
    model = create_model("au_cotrain", **r.model_kwargs)
    assert tuple(model.metadata.input_size) == (224, 224)


def test_c3d_and_multitask_paper_are_the_methods():
    from fer_core.losses.ecstfl import DEFAULT_LAMBDA, EcStflLoss

    c3d = get_recipe("c3d_ecstfl", "paper")
    assert c3d.data["align_faces"] == "auto" and c3d.data["resample"] == "keyframes+interpolate"
    # one lambda default: the loss class, the task's option and the profile agree
    assert c3d.loss_kwargs["lambda_weight"] == DEFAULT_LAMBDA == EcStflLoss().lambda_weight
    assert EcStflOptions().lambda_weight == DEFAULT_LAMBDA
    mt = get_recipe("multitask_fer", "paper")
    assert mt.model_kwargs["pyramid_input"] == "heatmaps" and mt.model_kwargs["encoder_placement"] == "lateral"


@pytest.mark.parametrize("network", ["ca_resnet", "micro_lsh", "au_cotrain", "c3d_ecstfl", "multitask_fer"])
def test_print_recipe_shows_the_paper_values(network):
    done = subprocess.run([sys.executable, "-m", "fer_cli", "train", network, "--profile", "paper", "--print-recipe"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = yaml.safe_load(done.stdout)
    assert printed == yaml.safe_load(yaml.safe_dump(get_recipe(network, "paper").to_dict()))
