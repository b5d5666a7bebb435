"""The README's Python example runs as written, and its first lines hold the two commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_lines_hold_install_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert block[0].startswith("pip install . && einplan train configs/tiny.json")
    assert block[1] == "pip install '.[test]' && pytest"


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "einplan").mkdir()
    (tmp_path / "einplan" / "data").symlink_to(ROOT / "einplan" / "data")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(1, 4, 256) float32" in out and "graph forward" in out
    assert (tmp_path / "tiny.plan").exists()
    assert (tmp_path / "runs" / "readme" / "checkpoints" / "step-000004").is_dir()
