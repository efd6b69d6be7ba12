"""``petserve params`` reproduces the papers' reference points and reports bad input clearly."""
from __future__ import annotations

import json

import pytest

from serving.cli import main


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
@pytest.mark.parametrize("kind", ["lora", "adapter", "vlpet"])
def test_every_kind_on_both_base_models(capsys, backbone, kind):
    out = _params(capsys, "--backbone", backbone, "--kind", kind)
    assert 0 < out["percent"] < 10


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
])
def test_bad_input_is_one_clear_line(capsys, argv, fragment):
    assert main(["params", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1
