"""Stage configs: merge order, key/type checking with suggestions, saved config, CLI errors."""
from __future__ import annotations

import pytest
import yaml

from twostage.classes import CLASSES, PALM_CLASSES
from twostage.cli import main
from twostage.config import StageConfig, all_keys, config_from_dict, describe, load_config, parse_override, read_config_yaml
from twostage.errors import TwostageError

STAGES = ["global", "palm", "demo-global", "demo-palm"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_file_loads_and_sets_only_known_keys(stage):
    cfg = load_config(stage)
    assert cfg.stage in ("global", "palm")
    assert cfg.classes == list(CLASSES if cfg.stage == "global" else PALM_CLASSES)


def test_merge_order_defaults_then_file_then_overrides_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {encoder: resnet18, input_size: 96}\ntrain: {epochs: 7}\n")
    cfg = load_config(config_file=f, overrides=["train.epochs=9", "optim.lr=3e-4",
                                                "data.classes=[Lunate, Scaphoid]"], epochs=11, data="D")
    assert cfg.model.encoder == "resnet18" and cfg.model.input_size == 96
    assert cfg.train.epochs == 11  # flag beats --set beats file
    assert cfg.optim.lr == pytest.approx(3e-4)  # "3e-4" (a YAML 1.1 string) accepted as a float
    assert cfg.data.root == "D"
    assert cfg.classes == ["Lunate", "Scaphoid"]
    assert cfg.model.arch == StageConfig().model.arch  # untouched default


def test_override_values_are_yaml_not_eval():
    assert parse_override("model.kwargs={encoder_depth: 3}") == ("model.kwargs", {"encoder_depth": 3})
    assert parse_override("data.split_file=__import__('os')") == ("data.split_file", "__import__('os')")
    with pytest.raises(TwostageError, match="key=value"):
        parse_override("model.encoder")


@pytest.mark.parametrize("override,match", [
    ("model.encodr=resnet34", "did you mean 'model.encoder'"),
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("models.arch=Unet", "did you mean 'model.arch'"),
    ("batch_size=4", "did you mean 'train.batch_size'"),
    ("train.epochs=ten", "train.epochs='ten' has the wrong type; expected int"),
    ("train.amp=3", "train.amp=3 has the wrong type"),
    ("data.classes=[Lunat]", "unknown class name"),
    ("data.fold=7", "data.fold=7"),
    ("train.best_metric=carpal", "did you mean 'carpal_mean'"),
])
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(TwostageError, match=match):
        load_config("global", overrides=[override])


def test_bad_key_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(TwostageError, match=r"c\.yaml: unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(config_file=f)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("palm", overrides=["model.input_size=[96, 128]", "box.jitter_shift=0.2"])
    cfg.save(tmp_path / "config.yaml")
    back = config_from_dict(read_config_yaml(tmp_path / "config.yaml"))
    assert back == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["box"]["jitter_shift"] == 0.2


def test_every_key_is_described():
    text = describe()
    for key in all_keys():
        section, _, name = key.rpartition(".")
        assert f"{name}:" in text
    assert all("#" in line for line in text.splitlines())


def test_cli_bad_key_is_one_line_error(capsys):
    rc = main(["train", "--stage", "global", "--set", "model.encodr=resnet34"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0 and "model.encoder" in err


def test_cli_missing_data_folder_is_one_line_error(tmp_path, capsys):
    rc = main(["train", "--stage", "demo-global", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0 and "does not exist" in err and "nope" in err


def test_cli_unknown_stage_lists_available(capsys):
    assert main(["train", "--stage", "glob"]) != 0
    err = capsys.readouterr().err
    assert "stage 'glob'" in err and "available: " in err and "global" in err


def test_a_stage_is_a_name_not_a_path():
    with pytest.raises(TwostageError, match="use --config FILE"):
        load_config("../stages/global")
