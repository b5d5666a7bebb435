"""`einplan graph`: golden text listings, DOT that Graphviz accepts, colours keyed on tags,
clear errors, and the HTML view searched in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest
from conftest import ONE_LAYER, check_golden

from einplan.api import compile_model
from einplan.cli import main
from einplan.compiler.trace import Builder
from einplan.report.dot import COLORS, graph_to_dot, node_kind

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def need(program: str | None, name: str) -> None:
    """Skip without ``name`` on a developer's machine; CI (.ci/run installs it) must have it."""
    if program is None:
        assert not os.environ.get("CI"), f"{name} is missing on CI (.ci/run installs it)"
        pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "one.plan"
    compile_model(ONE_LAYER).save(path)
    return str(path)


def test_layer_listing_matches_golden(plan_file, capsys):
    assert main(["graph", plan_file, "--layer", "0", "--format", "text"]) == 0
    check_golden("one_layer_layer0.txt", capsys.readouterr().out.rstrip("\n"))


def test_filter_listing_matches_golden(plan_file, capsys):
    assert main(["graph", plan_file, "--filter", "^attn_(q|k)-0"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    check_golden("one_layer_filter_qk.txt", out)
    assert "attn_v" not in out and "return" not in out


def test_unfiltered_listing_is_the_printed_graph(plan_file, capsys):
    assert main(["graph", plan_file]) == 0
    assert capsys.readouterr().out.rstrip("\n") == str(compile_model(ONE_LAYER).entry("forward"))


def test_dot_is_accepted_by_graphviz(plan_file, tmp_path, capsys):
    need(shutil.which("dot"), "Graphviz's dot")
    out = tmp_path / "g.dot"
    assert main(["graph", plan_file, "--layer", "0", "-o", str(out)]) == 0
    source = out.read_text()
    assert "subgraph cluster_layer0" in source and 'label="layer 0"' in source
    assert "<B>attn_o-0</B>" in source and re.search(r"einsum\[bsi,(oi|io)-&gt;bso\]", source)
    assert "f32[batch,seq,16]" in source
    assert "[label=1]" in source  # an edge into input slot 1
    r = subprocess.run(["dot", "-Tsvg", str(out)], capture_output=True)
    assert r.returncode == 0 and b"<svg" in r.stdout, r.stderr


@pytest.mark.parametrize("fmt, magic", [("svg", b"<svg"), ("png", b"\x89PNG")])
def test_rendered_pictures(plan_file, tmp_path, fmt, magic):
    need(shutil.which("dot"), "Graphviz's dot")
    out = tmp_path / f"g.{fmt}"
    assert main(["graph", plan_file, "--layer", "0", "-o", str(out)]) == 0
    assert magic in out.read_bytes()[:400]


def test_colours_are_keyed_on_tags_and_ops():
    b = Builder({"batch": 2, "seq": 4})
    x = b.input("x", ("batch", "seq", 4), "f32")
    with b.layer(0):
        w = b.param("attn_q.w", "w", (4, 4))
        kinds = {
            "linear": b.einsum("bsi,oi->bso", x, w, role="attn_q", tags=frozenset({"linear"})),
            "lora": b.einsum("bsi,oi->bso", x, w, role="lora_a", tags=frozenset({"lora"})),
            "quant": b.einsum("bsi,oi->bso", x, w, role="q", tags=frozenset({"quant"})),
            "reverse": b.einsum("bsi,oi->bso", x, w, role="g", tags=frozenset({"reverse"})),
            "recompute": b.einsum(
                "bsi,oi->bso", x, w, role="r", tags=frozenset({"reverse", "recompute"})
            ),
            "optimizer": b.add(w, w, role="adamw"),
        }
    nodes = b.graph.by_id()
    nodes[kinds["optimizer"].id] = nodes[kinds["optimizer"].id].with_(tags=frozenset({"optimizer"}))
    for kind, v in kinds.items():
        assert node_kind(nodes[v.id]) == kind
    assert node_kind(nodes[x.id]) == "input" and node_kind(nodes[w.id]) == "param"
    b.graph.nodes = list(nodes.values())
    source = graph_to_dot(b.graph, b.graph.nodes).source
    for kind in ("linear", "lora", "quant", "reverse", "recompute", "optimizer", "param", "input"):
        assert COLORS[kind] in source


def test_bad_input_gives_named_errors(plan_file, tmp_path, capsys, monkeypatch):
    cases = [
        (["graph", str(tmp_path / "none.plan")], "not found"),
        (["graph", plan_file, "--entry", "train_step"], "no entry 'train_step'"),
        (["graph", plan_file, "--layer", "7"], "layer 7"),
        (["graph", plan_file, "--filter", "nothing_like_this"], "'nothing_like_this'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on this PATH
    assert main(["graph", plan_file, "-o", str(tmp_path / "g.svg")]) == 2
    err = capsys.readouterr().err
    assert "Graphviz" in err and "apt-get install graphviz" in err


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium without network chatter or a shared profile."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1000,700",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


def test_html_view_finds_a_node_in_headless_chromium(plan_file, tmp_path):
    need(shutil.which("dot"), "Graphviz's dot")
    need(CHROMIUM, "Chromium")
    page = tmp_path / "g.html"
    assert main(["graph", plan_file, "-o", str(page)]) == 0
    html = page.read_text()
    for fetch in ("<link", "src=", "@import", "url(http"):
        assert fetch not in html  # self-contained: nothing to fetch
    url = page.as_uri() + "#search=attn_o-0"
    dom = run_chromium("--dump-dom", url).stdout
    assert re.search(r'id="status">2 of \d+ nodes match "attn_o-0"', dom), dom[-2000:]
    assert 'class="node hit current"' in dom
    assert dom.count('class="node hit') == 2  # attn_o-0 and its weight attn_o-0.w
    shot = tmp_path / "shot.png"
    run_chromium(f"--screenshot={shot}", url)
    assert shot.read_bytes()[:4] == b"\x89PNG"
