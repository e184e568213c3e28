"""`raylm mup-check`: the coordinate check's slope fit, and the command end to end at three small widths
(in process, seconds): μP's activations stay flat with width where sp's grow."""

from __future__ import annotations

import json

import numpy as np
import torch

from orchestration.artifacts import MUP_CHECK_FILE
from orchestration.cli import main
from orchestration.sweeps.mup_check import width_slopes

torch.set_num_threads(1)  # tiny models: threads only add contention on a loaded machine


def test_width_slopes_recover_each_layers_power_of_width():
    widths = (32, 64, 128, 256)
    exponents = np.array([[0.0, 0.5], [1.0, -0.5]])  # (layer, step)
    scales = 3.0 * np.asarray(widths, dtype=float) ** exponents[..., None]
    assert np.allclose(width_slopes(widths, scales), exponents)


def test_mup_check_writes_slopes_and_the_report(tmp_path, capsys):
    out = tmp_path / "check"
    argv = ["mup-check", "--out", str(out), "--widths", "32", "64", "128", "--steps", "3", "--seeds", "2"]
    assert main(argv) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    check = json.loads((out / MUP_CHECK_FILE).read_text())
    assert check["widths"] == [32, 64, 128] and check["steps"] == 3
    sp, mup = check["parametrizations"]["sp"], check["parametrizations"]["mup"]
    assert check["sp_max_abs_slope"] == sp["max_abs_slope"] and check["mup_max_abs_slope"] == mup["max_abs_slope"]
    # measured: sp 1.76 (block1.mlp), μP 0.056: sp's hidden layers grow ~width^2 after two updates, μP's stay put
    assert check["mup_max_abs_slope"] < 0.25 and check["sp_max_abs_slope"] > 1.0
    for layer, scales in mup["scales"].items():
        assert len(scales) == 3 and all(len(at_step) == 3 for at_step in scales), layer
    # at init the tied head reads an O(1) embedding: sp's logits grow as sqrt(width), μP's 1/m readout makes
    # them shrink as 1/sqrt(width) until the first updates bring them to O(1)
    assert abs(sp["slopes"]["logits"][0] - 0.5) < 0.1 and abs(mup["slopes"]["logits"][0] + 0.5) < 0.1
    assert abs(mup["slopes"]["logits"][-1]) < 0.1
    page = (out / "report.html").read_text()
    assert "alt='mup_check.png' src='data:image/png;base64," in page and (out / "mup_check.png").stat().st_size
    assert json.loads((out / "results.json").read_text())["kind"] == "mup-check"


def test_one_width_is_a_short_error(tmp_path, capsys):
    assert main(["mup-check", "--out", str(tmp_path), "--widths", "64", "64"]) == 2
    assert "at least two different widths" in capsys.readouterr().err
    assert not (tmp_path / MUP_CHECK_FILE).exists()
