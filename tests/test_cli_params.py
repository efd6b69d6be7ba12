"""``petserve params`` reproduces the papers' reference points and reports bad input clearly."""
from __future__ import annotations

import json

import pytest

from petserve.serving.cli import main


def _params(capsys, *argv):
    assert main(["params", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_single_adapter_on_bart_base_is_4_18_percent(capsys):
    out = _params(capsys, "--backbone", "bart-base", "--kind", "adapter")
    assert abs(out["percent"] - 4.18) <= 0.05
    assert out["total"] > out["trainable"] > 0


def test_vlpet_large_on_bart_base_is_4_16_percent(capsys):
    out = _params(capsys, "--backbone", "bart-base", "--kind", "vlpet", "--gate", "large")
    assert abs(out["percent"] - 4.16) <= 0.05


@pytest.mark.parametrize("backbone", ["bart-base", "t5-base"])
@pytest.mark.parametrize("kind", ["lora", "adapter", "vlpet", "compacter", "hyperformer", "prompt"])
def test_every_kind_on_both_base_models(capsys, backbone, kind):
    out = _params(capsys, "--backbone", backbone, "--kind", kind)
    assert 0 < out["percent"] < 10


# VL-Adapter's Table 1 (VL-BART-base, CLIP RN101, 4 image-text tasks): defaults are its settings.
@pytest.mark.parametrize("argv,paper", [
    (["--kind", "compacter"], 2.70),
    (["--kind", "hyperformer"], 5.79),
    (["--kind", "prompt"], 2.00),
    (["--kind", "lora"], 5.93),
    (["--kind", "adapter", "--sharing", "multiple"], 12.22),
    (["--kind", "adapter", "--sharing", "half-shared-up"], 8.36),
    (["--kind", "compacter", "--sharing", "multiple"], 7.05),
])
def test_vl_adapter_reference_points_on_bart_base(capsys, argv, paper):
    assert abs(_params(capsys, "--backbone", "bart-base", *argv)["percent"] - paper) <= 0.05


def test_sharing_counts_one_copy_per_task(capsys):
    two = _params(capsys, "--kind", "adapter", "--sharing", "multiple", "--tasks", "vqa,gqa")
    four = _params(capsys, "--kind", "adapter", "--sharing", "multiple")
    single = _params(capsys, "--kind", "adapter")
    assert four["trainable"] - two["trainable"] == 2 * (two["trainable"] - single["trainable"]) > 0


def test_options_change_the_count(capsys):
    small = _params(capsys, "--kind", "lora", "--r", "8")
    big = _params(capsys, "--kind", "lora", "--r", "64")
    assert big["trainable"] > small["trainable"]


@pytest.mark.parametrize("argv,fragment", [
    (["--kind", "nope"], "unknown kind"),
    (["--kind", "vlpet", "--gatee", "large"], "no option --gatee"),
    (["--kind", "vlpet", "--gate", "huge"], "--gate"),
    (["--kind", "lora", "--r"], "needs a value"),
    (["--backbone", "t5-large", "--kind", "lora"], "unknown backbone preset"),
    (["--kind", "prompt", "--length", "0"], "prompt length must be at least 1"),
    (["--kind", "adapter", "--sharing", "multiple", "--tasks", ","], "non-empty task list"),
    (["--kind", "compacter", "--n", "5"], "PHM n=5 must divide"),
])
def test_bad_input_is_one_clear_line(capsys, argv, fragment):
    assert main(["params", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1
