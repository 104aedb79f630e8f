"""Typed recipes and one-line CLI refusals (issue 11 item 11, issue 12): every ``--set`` / option case
gives the right value or a one-line refusal naming the key, with the documented exit code."""

from __future__ import annotations

import pytest
import yaml

from fer_cli.main import main
from fer_core.errors import EXIT_BUG, EXIT_USAGE, UsageError
from fer_core.training.recipe import Recipe, parse_set_options
from fer_core.training.tasks import get_recipe


def _set(*pairs: str, network: str = "ca_resnet") -> Recipe:
    return get_recipe(network, "quick").with_overrides(parse_set_options(list(pairs)))


def test_values_are_coerced_by_field_type():
    r = _set("lr=3e-4", "weight_decay=5e-4", "epochs=3", "amp=false", "loss_kwargs.gamma=1")
    assert (r.lr, r.weight_decay, r.epochs, r.amp) == (3e-4, 5e-4, 3, False)
    assert isinstance(r.lr, float) and isinstance(r.weight_decay, float)
    assert r.loss_kwargs["gamma"] == 1.0 and isinstance(r.loss_kwargs["gamma"], float)
    assert _set("data.fold=7", network="micro_lsh").data["fold"] == "7"  # micro folds are subject ids
    assert _set("augment.crop_area=[0.5, 1]").augment["crop_area"] == [0.5, 1.0]


@pytest.mark.parametrize("pair, message", [
    ("epochs=abc", "'epochs' must be an integer, got 'abc'"),
    ("batch_size=true", "'batch_size' must be an integer, got True"),
    ("max_steps_per_epoch=-1", "'max_steps_per_epoch' must be >= 0 (0 = no limit)"),
    ("lr=0", "'lr' must be > 0"),
    ("amp=3", "'amp' must be true or false"),
    ("loss_kwargs.gama=2", "unknown recipe key loss_kwargs.gama; known loss_kwargs keys: alpha, form, gamma, label_smoothing, reduction"),
    ("model_kwargs.bogus=3", "unknown recipe key model_kwargs.bogus; known model_kwargs keys:"),
    ("data.image_size=24", "unknown recipe key data.image_size; known data keys: val_fraction"),
    ("augment.crop_area=[0.5]", "'augment.crop_area' must hold 2 values"),
    ("lrr=1", "unknown recipe key 'lrr'"),
])
def test_bad_values_and_keys_are_refused_naming_the_key(pair, message):
    with pytest.raises(UsageError) as info:
        _set(pair)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_op_override_keeps_the_fingerprint():
    base = get_recipe("ca_resnet", "quick")
    same = _set(f"lr={base.lr}", "loss_kwargs.gamma=2", "epochs=12.0", "weight_decay=5e-4")
    assert same == base and same.fingerprint() == base.fingerprint()
    assert _set("lr=3e-4").fingerprint() != base.fingerprint()


def test_every_profile_is_typed_and_round_trips():
    from fer_core.models.catalog import list_networks

    for network in list_networks():
        for profile in ("quick", "paper"):
            r = get_recipe(network, profile)
            assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))) == r


def test_print_recipe_prints_the_resolved_recipe_as_yaml(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("epochs: 3\nloss_kwargs:\n  gamma: 1\n")
    assert main(["train", "ca_resnet", "--profile", "paper", "--config", str(tmp_path / "r.yaml"),
                 "--set", "lr=3e-4", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["network"] == "ca_resnet" and printed["profile"] == "paper"
    assert (printed["epochs"], printed["lr"], printed["loss_kwargs"]["gamma"]) == (3, 3e-4, 1.0)
    assert Recipe.from_dict(printed) == get_recipe("ca_resnet", "paper").with_overrides(
        {"epochs": 3, "lr": 3e-4, "loss_kwargs.gamma": 1.0})


def _cli_error(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv, needle", [
    (["train", "ca_resnet", "-d", "x", "--set", "lr=3e-4x"], "'lr' must be a number"),
    (["train", "ca_resnet", "-d", "x", "--set", "epochs=abc"], "'epochs' must be an integer"),
    (["train", "ca_resnet", "-d", "x", "--set", "model_kwargs.bogus=3"], "model_kwargs.bogus"),
    (["train", "ca_resnet", "-d", "x", "--set", "batch_size=true"], "'batch_size'"),
    (["train", "ca_resnet", "-d", "x", "--set", "max_steps_per_epoch=-1"], "'max_steps_per_epoch'"),
    (["train", "ca_resnet", "-d", "x", "--set", "lr=[1"], "--set lr"),
    (["train", "ca_resnet", "-d", "x", "--config", "/dev/zero"], "not a regular file"),
    (["train", "ca_resnet", "--profile", "quick", "--print-recipe", "--set", "loss_kwargs.gama=2"], "loss_kwargs.gama"),
    (["data", "add", "f", "{src}", "--format", "fer2013", "-o", "bogus=1"], "unknown adapter option fer2013.bogus"),
    (["data", "add", "f", "{src}", "--format", "fer2013", "-o", "ferplus_mode=[1"], "not a YAML value"),
    (["data", "add", "f", "{src}", "--format", "fer2013", "-o", "ferplus_mode=[1, 2]"], "'fer2013.ferplus_mode'"),
    (["ui", "--port", "99999"], "--port"),
])
def test_cli_refuses_in_one_line_with_exit_2(argv, needle, capsys, tmp_path, workspace):
    src = tmp_path / "src.csv"
    src.write_text("emotion,pixels,Usage\n")
    code, err = _cli_error([a.replace("{src}", str(src)) for a in argv], capsys)
    assert code == EXIT_USAGE, err
    assert err and needle in err[-1] and err[-1].startswith("fer"), err
    assert not any("Traceback" in line for line in err)


def test_an_unexpected_exception_is_a_bug_with_its_traceback(monkeypatch, capsys):
    import numpy as np

    from fer_cli import main as main_module

    def broken(args):
        np.zeros(3).reshape(2)  # numpy's ValueError: a bug, not the user's input

    original = main_module.build_parser

    def patched():
        parser = original()
        for action in parser._subparsers._group_actions[0].choices.values():
            if action.get_default("func") is not None and action.prog.endswith(" train"):
                action.set_defaults(func=broken)
        return parser

    monkeypatch.setattr(main_module, "build_parser", patched)
    code, err = _cli_error(["train", "--list"], capsys)
    assert code == EXIT_BUG
    assert any("Traceback" in line for line in err) and "bug" in err[-1]


def test_exit_codes_are_documented_in_fer_help(capsys):
    from fer_core.errors import EXIT_CODES

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code, meaning in EXIT_CODES:
        assert f"{code:>3}  {meaning}" in out


def test_an_unreachable_service_exits_with_the_service_code(capsys, workspace):
    from fer_core.errors import EXIT_SERVICE

    code, err = _cli_error(["serve", "--url", "127.0.0.1:9"], capsys)  # nothing listens on the discard port
    assert code == EXIT_SERVICE and "unreachable" in err[-1] and not any("Traceback" in line for line in err)
