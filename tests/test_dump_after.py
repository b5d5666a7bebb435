"""`einplan compile --dump-after PASS`: the graph as each named pass leaves it."""

from __future__ import annotations

from einplan.cli import main


def test_dump_after_prints_each_named_pass(tmp_path, capsys):
    argv = ["compile", "tiny", "-o", str(tmp_path / "t.plan")]
    assert main([*argv, "--dump-after", "simplify", "--dump-after", "memory"]) == 0
    out = capsys.readouterr().out
    simplify, memory = out.index("# after pass simplify"), out.index("# after pass memory")
    assert simplify < memory and "# after pass contract" not in out
    # buffers are assigned by the memory pass: only its dump shows them
    assert " buf" not in out[simplify:memory] and " buf" in out[memory:]


def test_dump_after_writes_files(tmp_path, capsys):
    argv = ["compile", "tiny", "-o", str(tmp_path / "t.plan"), "--dump-after", "contract"]
    assert main([*argv, "--dump-dir", str(tmp_path / "d")]) == 0
    text = (tmp_path / "d" / "forward.after-contract.txt").read_text()
    assert text.startswith("# after pass contract\ngraph forward(")


def test_unknown_pass_is_refused(tmp_path, capsys):
    assert main(["compile", "tiny", "--dump-after", "bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
