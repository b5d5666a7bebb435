"""The command line end to end, and bad input giving a named error and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import FIXTURES

from einplan.cli import main


def test_compile_then_eval_tiny(tmp_path, capsys):
    plan = tmp_path / "tiny.plan"
    assert main(["compile", "tiny", "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "758,912" in out and "estimated peak" in out
    assert (
        main(
            [
                "eval",
                str(plan),
                "--random-weights",
                "0",
                "--tokenizer",
                "bytes",
                "--max-tokens",
                "600",
                "--window",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "loss" in out and "perplexity" in out


def test_eval_with_a_fixture_checkpoint(tmp_path, capsys):
    case = FIXTURES / "llama_gqa_tied"
    plan = tmp_path / "m.plan"
    assert main(["compile", str(case / "config.json"), "-o", str(plan)]) == 0
    assert (
        main(
            [
                "eval",
                str(plan),
                "--weights",
                str(case),
                "--tokenizer",
                "bytes",
                "--max-tokens",
                "100",
                "--window",
                "50",
            ]
        )
        == 0
    )
    assert "tokens 100" in capsys.readouterr().out


def test_python_dash_m_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "einplan", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "einplan" in r.stdout


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    cfg = json.loads((FIXTURES / "llama_gqa_tied" / "config.json").read_text())
    cfg["hiden_size"] = 3
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    code, err = _err(capsys, ["compile", str(tmp_path / "c.json"), "-o", str(tmp_path / "p")])
    assert code != 0 and "unknown config key 'hiden_size'" in err


def test_missing_weights(tmp_path, capsys):
    main(["compile", "tiny", "-o", str(tmp_path / "t.plan")])
    code, err = _err(
        capsys,
        [
            "eval",
            str(tmp_path / "t.plan"),
            "--weights",
            str(tmp_path / "nowhere"),
            "--tokenizer",
            "bytes",
        ],
    )
    assert code != 0 and "nowhere" in err and "not found" in err


def test_weights_of_another_model(tmp_path, capsys):
    main(["compile", "tiny", "-o", str(tmp_path / "t.plan")])
    code, err = _err(
        capsys,
        [
            "eval",
            str(tmp_path / "t.plan"),
            "--weights",
            str(FIXTURES / "llama_gqa_tied"),
            "--tokenizer",
            "bytes",
        ],
    )
    assert code != 0 and "different model than this plan" in err and "hidden_size" in err


def test_foreign_plan(tmp_path, capsys):
    shutil.copy(FIXTURES / "llama_gqa_tied" / "config.json", tmp_path / "x.plan")
    code, err = _err(
        capsys, ["eval", str(tmp_path / "x.plan"), "--random-weights", "0", "--tokenizer", "bytes"]
    )
    assert code != 0 and "not an einplan plan file" in err


def test_missing_tokenizer(tmp_path, capsys):
    main(["compile", "tiny", "-o", str(tmp_path / "t.plan")])
    code, err = _err(capsys, ["eval", str(tmp_path / "t.plan"), "--random-weights", "0"])
    assert code != 0 and "no tokenizer" in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "einplan", "compile", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "none.json' not found" in r.stderr
    assert "Traceback" not in r.stderr
