"""Command-line arguments: sizes and sampling settings checked as they are parsed, help with
defaults, -V, --quiet, and the llama.cpp-style short flags."""

from __future__ import annotations

import pytest

import einplan
from einplan._version import __version__
from einplan.api import compile_model
from einplan.cli import main
from einplan.errors import EinplanError

RUN = ["run", "p.plan", "--random-weights", "0", "--prompt", "hi"]
EVAL = ["eval", "p.plan", "--random-weights", "0"]
TRAIN = ["train", "c.json", "--data", "t.txt", "--out", "r"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*TRAIN, "--steps", "0"], "--steps: expected a whole number of at least 1, got 0"),
        ([*EVAL, "--max-tokens", "-5"], "--max-tokens: expected a whole number of at least 1"),
        ([*EVAL, "--batch-size", "0"], "--batch-size: expected a whole number of at least 1"),
        ([*EVAL, "--window", "0"], "--window: expected a whole number"),
        ([*RUN, "--batch-size", "-1"], "--batch-size: expected a whole number"),
        ([*RUN, "--seed", "-3"], "--seed: expected a whole number of at least 0, got -3"),
        ([*RUN, "--max-new-tokens", "0"], "--max-new-tokens: expected a whole number"),
        ([*RUN, "--ctx", "0"], "--ctx: expected a whole number"),
        ([*RUN, "--workers", "-1"], "--workers: expected a whole number of at least 0"),
        ([*RUN, "--temperature", "nan"], "--temp: expected a finite number of at least 0"),
        ([*RUN, "--temperature", "-1"], "expected a finite number of at least 0, got -1"),
        ([*RUN, "--top-p", "1.5"], "--top-p: expected a number in (0, 1], got 1.5"),
        ([*RUN, "--repetition-penalty", "inf"], "expected a finite number above 0"),
        ([*RUN, "--top-k", "x"], "--top-k: expected a whole number of at least 0, got 'x'"),
        (["compile", "tiny", "--seq", "0"], "--seq: expected a whole number"),
        (["bench", "machine", "--reps", "0"], "--reps: expected a whole number"),
        (["report", "prof", "--top", "-2"], "--top: expected a whole number of at least 0"),
    ],
)
def test_bad_sizes_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps must be at least 1"), ({"workers": -1}, "workers must be 0")],
)
def test_train_api_refuses_bad_sizes(tmp_path, kwargs, message):
    with pytest.raises(EinplanError, match=message):
        einplan.train("tiny", data=tmp_path / "t.txt", out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_help_shows_defaults_and_version(capsys):
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens to generate (default: 64)" in text
    assert "-n MAX_NEW_TOKENS, --max-new-tokens" in text and "--temp TEMPERATURE" in text
    assert "-m WEIGHTS, --weights WEIGHTS" in text and "(default: None)" not in text
    assert main(["-V"]) == 0
    assert capsys.readouterr().out.strip() == f"einplan {__version__}"


def test_short_flags_and_quiet_print_only_the_generated_text(tmp_path, capsys):
    plan = tmp_path / "t.plan"
    compile_model("tiny").save(plan)
    argv = ["run", str(plan), "--random-weights", "0", "--tokenizer", "bytes", "-p", "Hi"]
    assert main([*argv, "-n", "3", "--temp", "0"]) == 0
    loud = capsys.readouterr()
    assert loud.out.startswith("Hi") and loud.err  # the phase table
    assert main(["--quiet", *argv, "-n", "3"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == loud.out.splitlines()[0] + "\n" and quiet.err == ""
    assert main([*argv, "-q", "-n", "3"]) == 0  # also after the subcommand
    assert capsys.readouterr().out == quiet.out
    out = tmp_path / "one.plan"
    assert main(["compile", "-q", "--no-path-cache", "-o", str(out), "tiny"]) == 0
    assert capsys.readouterr() == ("", "") and out.exists()
    assert main(["-q", "compile", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err  # errors are never silenced


@pytest.mark.parametrize("command", ["eval", "run", "serve"])
def test_every_command_that_opens_a_session_parses_what_it_reads(command):
    """open_session reads the weights, adapter, tokenizer and kernels options: each command
    that calls it must define them all (``einplan serve`` once lacked ``--kernels``)."""
    from einplan.cli import build_parser

    extra = {"run": ["-p", "x"]}.get(command, [])
    args = build_parser().parse_args([command, "p.plan", "--random-weights", "0", *extra])
    for name in ("weights", "random_weights", "adapter", "tokenizer", "kernels"):
        assert hasattr(args, name), f"einplan {command} has no --{name.replace('_', '-')}"
