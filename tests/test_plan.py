"""The plan file: a saved-and-loaded plan runs identically; foreign, damaged and other-version
files are refused with a message that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ONE_LAYER

import einplan
from einplan.compiler.plan import PlanError


def test_loaded_plan_runs_identically(tmp_path):
    plan = einplan.compile_model("tiny")
    plan.save(tmp_path / "t.plan")
    loaded = einplan.load_plan(tmp_path / "t.plan")
    assert str(loaded.entry("forward")) == str(plan.entry("forward"))
    ids = np.random.default_rng(0).integers(0, 256, (2, 40))
    a = einplan.Session(plan, random_seed=3).forward(ids)
    b = einplan.Session(loaded, random_seed=3).forward(ids)
    assert np.array_equal(a, b)


def test_plan_is_json_with_magic_and_version(tmp_path):
    einplan.compile_model(ONE_LAYER).save(tmp_path / "p.plan")
    doc = json.loads((tmp_path / "p.plan").read_text())
    assert doc["magic"] == "einplan-plan" and doc["plan_version"] == 1
    assert doc["body"]["config"]["hidden_size"] == 16


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n....", "not an einplan plan file"),
        (b'{"hello": "world"}', "no 'einplan-plan' magic"),
        (b"", "not an einplan plan file"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, message):
    (tmp_path / "x.plan").write_bytes(content)
    with pytest.raises(PlanError, match=message):
        einplan.load_plan(tmp_path / "x.plan")


def test_damaged_plan_is_refused(tmp_path):
    einplan.compile_model(ONE_LAYER).save(tmp_path / "p.plan")
    text = (tmp_path / "p.plan").read_text().replace('"rms_norm"', '"softmax"', 1)
    (tmp_path / "p.plan").write_text(text)
    with pytest.raises(PlanError, match="damaged"):
        einplan.load_plan(tmp_path / "p.plan")


def test_truncated_plan_is_refused(tmp_path):
    einplan.compile_model(ONE_LAYER).save(tmp_path / "p.plan")
    data = (tmp_path / "p.plan").read_bytes()
    (tmp_path / "p.plan").write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanError, match="damaged"):
        einplan.load_plan(tmp_path / "p.plan")


def test_other_version_is_refused(tmp_path):
    einplan.compile_model(ONE_LAYER).save(tmp_path / "p.plan")
    doc = json.loads((tmp_path / "p.plan").read_text())
    doc["plan_version"] = 99
    (tmp_path / "p.plan").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="version 99.*recompile"):
        einplan.load_plan(tmp_path / "p.plan")


def test_missing_plan_names_the_path(tmp_path):
    with pytest.raises(PlanError, match="nope.plan' not found"):
        einplan.load_plan(tmp_path / "nope.plan")
