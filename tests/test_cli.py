"""The `raylm` command line: help for every command, model-info output, config errors exit 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from orchestration.cli import build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in subcommands():
        assert name in out


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"raylm {command}" in out and "--" in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "orchestration", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "model-info" in result.stdout


def test_model_info_gpt2_small(capsys):
    assert main(["model-info", "--preset", "gpt2-small", "--num-workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "85,056,000" in out
    gpu_totals = [
        float(re.search(rf"^\s+{stage}\s+(?:[\d.]+\s+){{4}}([\d.]+)", out, re.M).group(1)) for stage in range(4)
    ]
    assert gpu_totals == sorted(gpu_totals, reverse=True) and gpu_totals[0] > gpu_totals[3]


def test_model_info_config_error_exits_2(capsys):
    assert main(["model-info", "model.n_layr=3"]) == 2
    assert "unknown key 'model.n_layr'" in capsys.readouterr().err


def test_bad_input_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "ReportError" in err and "not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["model-info", "--num-workers", "0"], "--num-workers"),
        (["model-info", "--micro-batch-size", "-1"], "--micro-batch-size"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "-1"], "--temperature"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "nan"], "--temperature"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "1.5"], "--top-p"),
        (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
        (["eval", "--checkpoint", "x", "--max-sequences", "0"], "--max-sequences"),
    ],
)
def test_out_of_range_options_are_one_line_errors_with_status_2(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


def test_unreachable_storage_is_a_config_error(tmp_path, capsys, monkeypatch):
    from helpers import tiny_corpus_manifest

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    manifest = tiny_corpus_manifest(tmp_path)
    argv = ["train", "train.storage_path=s3://raylm-nowhere/runs", "train.endpoint_url=http://127.0.0.1:9"]
    assert main([*argv, f"train.data={manifest}", "model.block_size=32"]) == 2
    err = capsys.readouterr().err
    assert "train.storage_path: cannot reach s3://raylm-nowhere/runs/run" in err and "Traceback" not in err
