"""Bad input on the command line is one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests._train_fixtures import write_shards
from vgclip.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_config_key(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "tiny", "train.lrr=1"])
    assert code == 2
    assert "unknown config key 'train.lrr'" in _one_line_error(capsys)
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "tiny", "train.epoch=3"])
    assert code == 2
    assert "unknown config key 'train.epoch' (did you mean 'train.epochs'? known keys here:" in _one_line_error(capsys)


@pytest.mark.parametrize(("argv", "hint"), [(["--train.epochs", "3"], "did you mean `train.epochs=3`?"),
                                           (["--train.epoch=3"], "did you mean `train.epochs=3`?"),
                                           (["--epochs", "3"], "did you mean `train.epochs=3`?"),
                                           (["--nonsense"], None)])
def test_unknown_option_shows_the_commands_usage_and_suggests_an_override(tmp_path, capsys, argv, hint):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vgclip train ") and "usage: vgclip [" not in err
    line = [ln for ln in err.splitlines() if "error:" in ln][0]
    assert line.startswith("vgclip train: error: unrecognized arguments: " + argv[0])
    assert (hint in line) if hint else "did you mean" not in line


def test_unknown_option_of_a_command_without_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--captions-csv", "x.csv", "--out", str(tmp_path), "--train.epochs", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: vgclip prepare ") and "did you mean" not in err


@pytest.mark.parametrize(("override", "message"), [("train.lr=[1", "not valid YAML"),
                                                   ("data.batch_size=0", "data.batch_size must be >= 1")])
def test_bad_override_values(tmp_path, capsys, override, message):
    shards = tmp_path / "shards"
    write_shards(shards, n_train=4, n_val=0)
    code = main(["train", "--data", str(shards), "--out", str(tmp_path / "run"), "--config", "tiny", override])
    assert code == 2
    assert message in _one_line_error(capsys)


def test_missing_vg_root_files(tmp_path, capsys):
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "image_data.json").write_text("[]")
    code = main(["prepare", "--vg-root", str(tmp_path / "vg"), "--out", str(tmp_path / "shards")])
    assert code == 2
    assert "region_descriptions.json" in _one_line_error(capsys)


def test_checkpoint_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code = main(["zeroshot", "--checkpoint", str(missing), "--voc-root", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert str(missing) in _one_line_error(capsys)


@pytest.mark.parametrize("command", ["synth", "prepare", "train", "zeroshot", "predict", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vgclip" in capsys.readouterr().out


def test_console_script_runs_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "vgclip.cli", "train", "--data", "/nonexistent", "--out", "/tmp/x"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "/nonexistent" in result.stderr and "Traceback" not in result.stderr
