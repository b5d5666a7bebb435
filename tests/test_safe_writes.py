"""Outputs never destroy inputs or old files: an output equal to an input is refused, a run
folder is not replaced without --overwrite, a failed write names the path and leaves the
previous file, and outputs get a plain file's mode."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import ONE_LAYER

import einplan
from einplan.api import compile_model
from einplan.cli import main
from einplan.errors import EinplanError
from einplan.formats.files import write_atomic

CORPUS = Path(einplan.__file__).parent / "data" / "shakespeare_sample.txt"
MICRO = {
    **ONE_LAYER,
    "vocab_size": 256,
    "train": {
        "seq_len": 8,
        "micro_batch": 1,
        "steps": 2,
        "log_every": 1,
        "eval_batches": 1,
        "tokenizer": "bytes",
    },
}


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "one.plan"
    compile_model(ONE_LAYER).save(path)
    return path


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2, return its error text."""
    assert main(argv) == 2
    return capsys.readouterr().err


def test_output_equal_to_input_is_refused_and_the_input_kept(tmp_path, plan_file, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(ONE_LAYER))
    before = config.read_bytes(), plan_file.read_bytes()
    assert "also an input" in refused(["compile", str(config), "-o", str(config)], capsys)
    assert "also an input" in refused(["graph", str(plan_file), "-o", str(plan_file)], capsys)
    link = tmp_path / "link.plan"
    link.symlink_to(plan_file)
    assert "would destroy" in refused(["graph", str(plan_file), "-o", str(link)], capsys)
    assert (config.read_bytes(), plan_file.read_bytes()) == before


def test_report_over_its_trace_and_profile_over_an_input_are_refused(tmp_path, capsys):
    prof, tiny = tmp_path / "prof", tmp_path / "tiny.plan"
    compile_model("tiny").save(tiny)
    run = ["eval", str(tiny), "--random-weights", "0", "--tokenizer", "bytes"]
    assert main([*run, "--max-tokens", "40", "--window", "16", "--profile", str(prof)]) == 0
    trace = prof / "trace.json"
    before = trace.read_bytes()
    assert "also an input" in refused(["report", str(prof), "-o", str(trace)], capsys)
    assert "also an input" in refused(["report", str(prof), "--bars", str(trace)], capsys)
    assert trace.read_bytes() == before
    text = tmp_path / "text"
    text.mkdir()
    (text / "trace.json").write_text("the corpus")
    argv = [*run, "--text-file", str(text / "trace.json"), "--profile", str(text)]
    assert "also an input" in refused(argv, capsys)
    assert (text / "trace.json").read_text() == "the corpus"


def test_train_into_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    out = tmp_path / "run"
    argv = ["train", str(config), "--data", str(CORPUS), "--out", str(out)]
    assert main([*argv, "--steps", "1"]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    err = refused([*argv, "--steps", "1"], capsys)
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert "give one" in refused([*argv, "--resume", "--overwrite"], capsys)
    with pytest.raises(EinplanError, match="already holds a run"):
        einplan.train(config, data=CORPUS, out=out, steps=1)
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "removed the previous run's checkpoints, metrics.jsonl" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002"]


def fail_replace(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_names_the_path_and_keeps_the_old_file(
    tmp_path, plan_file, capsys, monkeypatch
):
    out = tmp_path / "g.txt"
    out.write_text("old listing")
    monkeypatch.setattr(os, "replace", fail_replace)
    err = refused(["graph", str(plan_file), "-o", str(out)], capsys)
    assert f"cannot write {out}: No space left on device" in err
    err = refused(["compile", "tiny", "--no-path-cache", "-o", str(plan_file)], capsys)
    assert f"cannot write {plan_file}: No space left on device" in err
    monkeypatch.undo()
    assert out.read_text() == "old listing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.txt", "one.plan"]  # no temp left
    blocked = tmp_path / "g.txt" / "sub.txt"  # its folder is a regular file (blocks root too)
    err = refused(["graph", str(plan_file), "-o", str(blocked)], capsys)
    assert "cannot write" in err and str(blocked) in err and "Traceback" not in err


def test_outputs_get_a_plain_files_mode(tmp_path, plan_file, capsys):
    old = os.umask(0o022)
    try:
        assert main(["graph", str(plan_file), "-o", str(tmp_path / "g.dot")]) == 0
        assert main(["compile", "tiny", "-o", str(tmp_path / "t.plan")]) == 0
        write_atomic(tmp_path / "w.bin", b"\0")
    finally:
        os.umask(old)
    for name in ("g.dot", "t.plan", "w.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
