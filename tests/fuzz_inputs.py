"""Seeded mutation fuzzing of einplan's input files (issue #12), shared by tests/test_fuzz.py
and benchmarks/fuzz_report.py.

Each input class (plan files, safetensors files, GGUF files, training checkpoints, configs)
has a list of mutators. Case ``seed`` of a class applies mutator ``seed % len(mutators)`` with
parameters drawn from ``random.Random(f"{class}:{seed}")``, runs the command that reads the
input in-process through :func:`einplan.cli.main` (a SIGALRM time limit, an address-space
limit so that absurd sizes fail instead of swapping), and classifies the outcome:

- ``clear_error``: exit 2 with ``einplan: error: ...`` (or an argparse usage error),
- ``ok``: exit 0 and, where the mutation has an oracle, the right result: a mutation that
  keeps the meaning (``expect="same"``) must give the pristine input's result; a mutation
  that breaks the input (``expect="reject"``) may be accepted only if the result is unchanged;
  ``expect="any"`` is a legitimate change. A NaN or inf in the result is never ok,
- ``silent_wrong``: exit 0 with a wrong (or NaN) result,
- ``traceback``: any other exception or exit status,
- ``hang``: the time limit ran out,
- ``data_loss``: an input file was changed or deleted by a command that failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from test_train import MICRO as TRAIN_MICRO

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURE = TESTS / "fixtures" / "llama_gqa_tied"
CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"

CLASSES = ("plan", "safetensors", "gguf", "checkpoint", "config")
OUTCOMES = ("ok", "clear_error", "traceback", "hang", "silent_wrong", "data_loss")
BAD = ("traceback", "hang", "silent_wrong", "data_loss")

# test_train's two-layer model (a compile, an eval or a resumed train step takes a fraction of
# a second), logging and checkpointing every step or two so that a short run has them to damage
MICRO = {
    **TRAIN_MICRO,
    "train": {**TRAIN_MICRO["train"], "accumulation": 1, "log_every": 1, "checkpoint_every": 2},
}
EVAL = ["--tokenizer", "bytes", "--max-tokens", "32", "--window", "16"]


# ---------------------------------------------------------------- running one command


class CaseTimeout(BaseException):
    """Raised in the main thread by SIGALRM when a case runs past its limit."""


@dataclass
class Run:
    """What one in-process ``einplan`` invocation did."""

    code: int | None  # exit status; None: it raised
    out: str
    err: str
    exc: str = ""  # "Type: message" of an escaped exception
    where: str = ""  # the innermost einplan frame of that exception
    hang: bool = False


def _alarm(signum, frame):
    raise CaseTimeout()


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Cap this process's address space at its current size plus ``extra_bytes`` (so that an
    absurd size fails with MemoryError instead of swapping the machine), then restore it."""
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        old = resource.getrlimit(resource.RLIMIT_AS)
        cap = current + extra_bytes
        if old[1] != resource.RLIM_INFINITY:
            cap = min(cap, old[1])
        resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def run_cli(argv: list[str], timeout: float) -> Run:
    """``einplan ARGV`` in this process, with stdout/stderr captured and a time limit
    (SIGALRM: must be called from the main thread)."""
    from einplan.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    old_stdin = sys.stdin
    old_filters = warnings.filters[:]
    sys.stdin = io.StringIO("")
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN arithmetic: judged by result
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
        return Run(code, out.getvalue(), err.getvalue())
    except CaseTimeout:
        return Run(None, out.getvalue(), err.getvalue(), hang=True)
    except BaseException as e:  # noqa: BLE001 - classifying every escape is the point
        signal.setitimer(signal.ITIMER_REAL, 0)
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "einplan" in f.filename]
        where = ""
        if frames:
            f = frames[-1]
            where = f"{f.filename.split('einplan/', 1)[-1]}:{f.lineno} in {f.name}"
        return Run(None, out.getvalue(), err.getvalue(), f"{type(e).__name__}: {msg}", where)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.stdin = old_stdin
        warnings.filters[:] = old_filters


def short_argv(argv: list[str], workdir: Path) -> str:
    """The command line with the case folder and the repository left out of its paths."""
    text = " ".join(argv)
    return text.replace(f"{workdir}/", "").replace(f"{ROOT}/", "")


def snapshot(paths: list[Path]) -> dict[str, str]:
    """Content hashes of every file (and link target) under ``paths``: the inputs whose
    change or deletion by a failing command is data loss."""
    snap: dict[str, str] = {}

    def add(p: Path) -> None:
        if p.is_symlink():
            snap[str(p)] = "link:" + os.readlink(p)
        elif p.is_dir():
            snap[str(p)] = "dir"
            for c in sorted(p.iterdir()):
                add(c)
        elif p.exists():
            snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()

    for p in paths:
        add(p)
    return snap


# ---------------------------------------------------------------- cases and outcomes


@dataclass
class Result:
    """One fuzz case and its outcome."""

    cls: str
    seed: int
    mutation: str
    detail: str  # what exactly was changed
    expect: str
    argv: str
    outcome: str = ""
    message: str = ""  # the error line, the exception, or why the result is wrong
    where: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for an assertion message or a report."""
        loc = f" @ {self.where}" if self.where else ""
        return (
            f"[{self.cls} seed={self.seed}] {self.mutation} ({self.detail}): {self.outcome}: "
            f"{self.message}{loc}\n    einplan {self.argv}"
        )


@dataclass
class Command:
    """A command to run on a case's files, and how to read its result for the oracle."""

    argv: list[str]
    signature: Callable[[Run, Path], str]
    then: Command | None = None  # run after this one succeeds (compile, then eval)


LOSS = re.compile(r"loss (\S+)\s+perplexity (\S+)")
TRAIN_LOSS = re.compile(r"step (\d+)\s+loss (\S+)\s+val (\S+)")


def none(run: Run, _: Path) -> str:
    return ""


def eval_signature(run: Run, _: Path) -> str:
    m = LOSS.search(run.out)
    return f"loss {m.group(1)} ppl {m.group(2)}" if m else "no loss printed: " + run.out[-200:]


def graph_signature(run: Run, _: Path) -> str:
    """The graph listing up to the order of each node's attributes (which follows the order
    of the keys in the file, so a reordered but equal plan lists them in another order)."""
    return "\n".join("".join(sorted(line)) for line in run.out.splitlines())


def generated_signature(run: Run, _: Path) -> str:
    return run.out.strip()


def train_signature(run: Run, _: Path) -> str:
    rows = TRAIN_LOSS.findall(run.out)
    return " ".join(f"step {s} loss {a} val {b}" for s, a, b in rows) or "no step printed"


def folder_signature(run: Run, out: Path) -> str:
    """Hash of a converted HF folder: its config and every tensor's name, dtype and bytes."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    cfg = out / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"no config")
    st = out / "model.safetensors"
    if st.is_file():
        for k, v in sorted(load_file(st).items()):
            h.update(k.encode() + str(v.dtype).encode() + v.tobytes())
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                return "non-finite tensor " + k
    return h.hexdigest()


def nonfinite(sig: str) -> bool:
    return bool(re.search(r"\b(nan|inf|-inf|non-finite)\b", sig, re.I))


@dataclass
class Case:
    """A mutated input, ready to run."""

    workdir: Path
    inputs: list[Path]
    command: Command
    detail: str = ""
    expect: str = ""  # set by a mutator that finds its edit legitimate: overrides its expect


@dataclass
class Mutator:
    name: str
    expect: str  # same | reject | any
    apply: Callable[[random.Random, Case], str]  # mutates the case's files; returns detail


# ---------------------------------------------------------------- JSON helpers


def json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) inside a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, (*prefix, i))
    return out


def get_path(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def set_path(obj: Any, path: tuple, value: Any) -> None:
    get_path(obj, path[:-1])[path[-1]] = value


def del_path(obj: Any, path: tuple) -> None:
    del get_path(obj, path[:-1])[path[-1]]


def other_type(rng: random.Random, value: Any) -> Any:
    """A value of another JSON type than ``value``."""
    choices = [None, True, -7, 2.5, "x", [], {}, [1, 2], {"k": 1}]
    choices = [c for c in choices if type(c) is not type(value)]
    return rng.choice(choices)


def bad_number(rng: random.Random) -> Any:
    return rng.choice([0, -1, -(2**31), 2**31, 10**12, 2**63, 2**64 + 1, 1e308, 0.5, -0.0])


def show(path: tuple) -> str:
    return ".".join(str(p) for p in path)[-90:]


def write_json(path: Path, doc: Any, **kw) -> None:
    path.write_text(json.dumps(doc, **kw))


# ---------------------------------------------------------------- plan files


def resign(doc: dict) -> None:
    """Recompute a plan document's checksum so that an edit of its body passes it."""
    from einplan.compiler.plan import checksum

    doc["checksum"] = checksum(doc["body"])


def plan_edit(fn: Callable[[random.Random, dict], str], sign: bool = True, program: bool = False):
    """A plan mutator editing the parsed document (then re-signing the body). ``program``: an
    edit that may yield another well-formed program (an input rewired to another value of
    the same type: ``add(x, h)`` to ``add(x, norm_weight)``). Re-signed and passing every check
    of the loader, such a plan cannot be told from one compiled from another model (only
    recompiling its config could), so when it loads its result may differ ("any")."""

    def apply(rng: random.Random, case: Case) -> str:
        path = case.inputs[0]
        doc = json.loads(path.read_text())
        detail = fn(rng, doc)
        if sign and isinstance(doc.get("body"), dict):
            resign(doc)
        write_json(path, doc, separators=(",", ":"))
        if program and loads(path):
            case.expect = "any"
            detail += " (well-formed: another program)"
        return detail

    return apply


def loads(path: Path) -> bool:
    """Whether einplan accepts a plan file (every check of the loader)."""
    from einplan.api import load_plan

    try:
        load_plan(path)
    except Exception:  # noqa: BLE001 - refused (or failing: the case itself will show it)
        return False
    return True


def random_node(rng: random.Random, doc: dict) -> tuple[str, dict]:
    entries = doc["body"]["entries"]
    name = rng.choice(sorted(entries))
    return name, rng.choice(entries[name]["nodes"])


def _reformat(rng, case):
    path = case.inputs[0]
    doc = json.loads(path.read_text())
    write_json(path, doc, indent=rng.choice([1, 2, 4]), sort_keys=rng.random() < 0.5)
    return "re-indented JSON"


def _shuffle_keys(obj, rng):
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffle_keys(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffle_keys(v, rng) for v in obj]
    return obj


def _plan_key_order(rng, case):
    path = case.inputs[0]
    write_json(path, _shuffle_keys(json.loads(path.read_text()), rng))
    return "keys shuffled"


def _drop_top(rng, doc):
    k = rng.choice(["magic", "plan_version", "checksum", "body"])
    del doc[k]
    return f"no {k}"


def _top_type(rng, doc):
    k = rng.choice(["magic", "plan_version", "checksum", "body"])
    doc[k] = other_type(rng, doc[k])
    return f"{k} = {doc[k]!r}"[:80]


def _drop_body_path(rng, doc):
    p = rng.choice([p for p in json_paths(doc["body"]) if len(p) <= 4])
    del_path(doc["body"], p)
    return f"deleted body.{show(p)}"


def _body_wrong_type(rng, doc):
    p = rng.choice(json_paths(doc["body"]))
    v = other_type(rng, get_path(doc["body"], p))
    set_path(doc["body"], p, v)
    return f"body.{show(p)} = {v!r}"


def _node_drop_key(rng, doc):
    e, n = random_node(rng, doc)
    k = rng.choice(sorted(n))
    del n[k]
    return f"{e} node {n.get('id')}: no {k}"


def _node_op(rng, doc):
    from einplan.compiler.ops import Op

    e, n = random_node(rng, doc)
    new = rng.choice([o.value for o in Op if o.value != n["op"]] + ["bogus", ""])
    old, n["op"] = n["op"], new
    return f"{e} node {n['id']}: op {old} -> {new}"


def _node_shape(rng, doc):
    e, n = random_node(rng, doc)
    old = list(n["shape"])
    if not n["shape"]:
        n["shape"] = [rng.choice([2, 0, -1])]
    else:
        i = rng.randrange(len(n["shape"]))
        d = n["shape"][i]
        if isinstance(d, int):
            n["shape"][i] = rng.choice([0, -1, d + 1, max(1, d // 2), 2**40, "seq"])
        else:  # a symbolic dim
            n["shape"][i] = rng.choice([1, 7, "bogus", "seq" if d != "seq" else "batch"])
    if rng.random() < 0.2:
        n["shape"].append(3)
    return f"{e} node {n['id']} ({n['op']}): shape {old} -> {n['shape']}"


def _node_inputs(rng, doc):
    e, n = random_node(rng, doc)
    ids = [m["id"] for m in doc["body"]["entries"][e]["nodes"]]
    old = list(n["in"])
    kind = rng.choice(["other", "missing", "self", "later", "extra", "drop"])
    if kind == "extra" or not n["in"]:
        n["in"].append(rng.choice(ids))
    elif kind == "drop":
        n["in"].pop()
    else:
        i = rng.randrange(len(n["in"]))
        n["in"][i] = {
            "other": rng.choice(ids),
            "missing": max(ids) + 1000,
            "self": n["id"],
            "later": max(ids),
        }[kind]
    return f"{e} node {n['id']} ({n['op']}): inputs {old} -> {n['in']}"


def _node_dtype(rng, doc):
    e, n = random_node(rng, doc)
    old, n["dtype"] = n["dtype"], rng.choice(["f16", "bf16", "f64", "i8", "bogus", "i64"])
    return f"{e} node {n['id']} ({n['op']}): dtype {old} -> {n['dtype']}"


def _node_attr(rng, doc):
    entries = doc["body"]["entries"]
    nodes = [(e, n) for e in sorted(entries) for n in entries[e]["nodes"] if n.get("attrs")]
    e, n = rng.choice(nodes)
    p = rng.choice(json_paths(n["attrs"]))
    old = get_path(n["attrs"], p)
    if isinstance(old, int | float) and not isinstance(old, bool) and rng.random() < 0.6:
        new = rng.choice([bad_number(rng), float("nan"), float("inf")])
    else:
        new = other_type(rng, old)
    set_path(n["attrs"], p, new)
    return f"{e} node {n['id']} ({n['op']}): attrs.{show(p)} {old!r} -> {new!r}"[:160]


def _entry_dims(rng, doc):
    e = rng.choice(sorted(doc["body"]["entries"]))
    dims = doc["body"]["entries"][e]["dims"]
    k = rng.choice(sorted(dims))
    old, dims[k] = dims[k], rng.choice([0, -1, 1, dims[k] * 2, 2**40, "seq", None])
    return f"{e} dims.{k} {old} -> {dims[k]!r}"


def _entry_outputs(rng, doc):
    e = rng.choice(sorted(doc["body"]["entries"]))
    g = doc["body"]["entries"][e]
    k = rng.choice(sorted(g["outputs"]))
    ids = [n["id"] for n in g["nodes"]]
    old, g["outputs"][k] = g["outputs"][k], rng.choice([max(ids) + 5, -1, ids[0], "x"])
    return f"{e} outputs.{k} {old} -> {g['outputs'][k]!r}"


def _annotation(rng, doc):
    e = rng.choice(sorted(doc["body"]["entries"]))
    ann = doc["body"]["entries"][e]["annotations"]
    k = rng.choice(sorted(ann))
    field_ = rng.choice(sorted(ann[k]))
    old = ann[k][field_]
    if field_ == "free_after":
        ids = [n["id"] for n in doc["body"]["entries"][e]["nodes"]]
        new = sorted({*old, rng.choice(ids)}) if rng.random() < 0.7 else [-3]
    else:
        new = rng.choice([0, -1, 10**6, None, "x"])
    ann[k][field_] = new
    return f"{e} annotations.{k}.{field_} {old!r} -> {new!r}"[:160]


def _plan_config(rng, doc):
    cfg = doc["body"]["config"]
    k = rng.choice([k for k, v in sorted(cfg.items()) if isinstance(v, int | float)])
    old, cfg[k] = cfg[k], rng.choice([0, -2, cfg[k] * 2, float("nan"), "8"])
    return f"body.config.{k} {old!r} -> {cfg[k]!r}"


def _plan_nan(rng, doc):
    """A float attribute (eps, theta, scale) set to NaN or inf."""
    entries = doc["body"]["entries"]
    spots = [
        (e, n, p)
        for e in sorted(entries)
        for n in entries[e]["nodes"]
        for p in json_paths(n.get("attrs", {}))
        if isinstance(get_path(n["attrs"], p), float)
    ]
    if not spots:
        return _plan_config(rng, doc)
    e, n, p = rng.choice(spots)
    v = rng.choice([float("nan"), float("inf"), -float("inf")])
    set_path(n["attrs"], p, v)
    return f"{e} node {n['id']} ({n['op']}): attrs.{show(p)} = {v}"


def _bytes_flip(rng, case):
    path = case.inputs[0]
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] = rng.choice([c for c in b'{}[]",:0123456789aeZ\x00\xff' if c != data[i]])
    path.write_bytes(bytes(data))
    return "bytes replaced"


def _truncate(rng, case):
    path = case.inputs[0]
    data = path.read_bytes()
    n = rng.choice([0, 1, rng.randrange(len(data)), len(data) - 1])
    path.write_bytes(data[:n])
    return f"truncated to {n} of {len(data)} bytes"


def _to_dir(rng, case):
    path = case.inputs[0]
    path.unlink()
    path.mkdir()
    return "a directory"


def _not_json(rng, case):
    path = case.inputs[0]
    kind = rng.choice(["binary", "list", "null", "latin1", "nan"])
    path.write_bytes(
        {
            "binary": bytes(range(256)),
            "list": b"[1, 2, 3]",
            "null": b"null",
            "latin1": b'{"magic": "\xe9"}',
            "nan": b"NaN",
        }[kind]
    )
    return kind


PLAN_MUTATORS = [
    Mutator("reformat", "same", _reformat),
    Mutator("key_order", "same", _plan_key_order),
    Mutator("drop_top_key", "reject", plan_edit(_drop_top, sign=False)),
    Mutator("top_wrong_type", "reject", plan_edit(_top_type, sign=False)),
    Mutator("drop_body_path", "reject", plan_edit(_drop_body_path)),
    Mutator("body_wrong_type", "reject", plan_edit(_body_wrong_type)),
    Mutator("node_drop_key", "reject", plan_edit(_node_drop_key)),
    Mutator("node_op", "reject", plan_edit(_node_op)),
    Mutator("node_shape", "reject", plan_edit(_node_shape)),
    Mutator("node_inputs", "reject", plan_edit(_node_inputs, program=True)),
    Mutator("node_dtype", "reject", plan_edit(_node_dtype)),
    Mutator("node_attr", "reject", plan_edit(_node_attr)),
    Mutator("entry_dims", "reject", plan_edit(_entry_dims)),
    Mutator("entry_outputs", "reject", plan_edit(_entry_outputs)),
    Mutator("annotation", "reject", plan_edit(_annotation)),
    Mutator("config_edit", "reject", plan_edit(_plan_config)),
    Mutator("nan_attr", "reject", plan_edit(_plan_nan)),
    Mutator("byte_flip", "reject", _bytes_flip),
    Mutator("truncate", "reject", _truncate),
    Mutator("not_a_plan", "reject", _not_json),
    Mutator("directory", "reject", _to_dir),
]


# ---------------------------------------------------------------- safetensors files


def read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_st(path: Path, header: Any, body: bytes, pad: int = 0, n: int | None = None) -> None:
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + body)


def st_edit(fn: Callable[[random.Random, dict, bytes], tuple[Any, bytes, str]]):
    """A safetensors mutator editing the parsed header (and data) of the case's file."""

    def apply(rng: random.Random, case: Case) -> str:
        path = case.inputs[-1]
        header, body = read_st(path)
        header, body, detail = fn(rng, header, body)
        write_st(path, header, body)
        return detail

    return apply


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _st_reorder(rng, header, body):
    items = list(header.items())
    rng.shuffle(items)
    return dict(items), body, "header keys reordered"


def _st_padded(rng, case):
    path = case.inputs[-1]
    header, body = read_st(path)
    write_st(path, header, body, pad=rng.choice([1, 7, 8, 100]))
    return "header padded with spaces"


def _st_metadata(rng, header, body):
    header["__metadata__"] = {**header.get("__metadata__", {}), "note": "fuzz", "x": "1"}
    return header, body, "extra __metadata__"


def _st_header_type(rng, header, body):
    new = rng.choice([[], [header], 7, "x", None, True])
    return new, body, f"header is {type(new).__name__}"


def _st_info_type(rng, header, body):
    k = rng.choice(tensor_names(header))
    header[k] = other_type(rng, header[k])
    return header, body, f"{k} = {header[k]!r}"


def _st_metadata_type(rng, header, body):
    header["__metadata__"] = rng.choice([[1], 5, "x", {"format": 5}, {"a": [1]}])
    return header, body, f"__metadata__ = {header['__metadata__']!r}"


def _st_drop_field(rng, header, body):
    k = rng.choice(tensor_names(header))
    f = rng.choice(["dtype", "shape", "data_offsets"])
    del header[k][f]
    return header, body, f"{k}: no {f}"


def _st_field_type(rng, header, body):
    k = rng.choice(tensor_names(header))
    f = rng.choice(["dtype", "shape", "data_offsets"])
    old = header[k][f]
    header[k][f] = rng.choice(
        [other_type(rng, old), [str(x) for x in old] if isinstance(old, list) else 3]
        + ([[float(x) + 0.5 for x in old]] if isinstance(old, list) else [])
    )
    return header, body, f"{k}.{f} {old!r} -> {header[k][f]!r}"


def _st_offsets(rng, header, body):
    k = rng.choice(tensor_names(header))
    b, e = header[k]["data_offsets"]
    kind = rng.choice(["negative", "reversed", "past_end", "one_short", "huge", "three"])
    new = {
        "negative": [b - len(body) - 64, e - len(body) - 64],
        "reversed": [e, b],
        "past_end": [b + len(body), e + len(body)],
        "one_short": [b, e - 1],
        "huge": [2**63, 2**63 + (e - b)],
        "three": [b, e, e],
    }[kind]
    header[k]["data_offsets"] = new
    return header, body, f"{k}.data_offsets {[b, e]} -> {new} ({kind})"


def _st_overlap(rng, header, body):
    """Two tensors of one shape pointing at the same bytes (the spec forbids overlaps)."""
    by_shape: dict[tuple, list[str]] = {}
    for k in tensor_names(header):
        by_shape.setdefault(tuple(header[k]["shape"]), []).append(k)
    groups = [v for v in by_shape.values() if len(v) > 1]
    a, b = rng.sample(rng.choice(groups), 2)
    header[a]["data_offsets"] = list(header[b]["data_offsets"])
    return header, body, f"{a} shares {b}'s bytes"


def _st_shape(rng, header, body):
    k = rng.choice([k for k in tensor_names(header) if len(header[k]["shape"]) == 2])
    r, c = old = header[k]["shape"]
    kind = rng.choice(["negative", "transposed", "huge", "zero", "flat", "extra_dim"])
    new = {
        "negative": [-r, -c],
        "transposed": [c, r],
        "huge": [2**62, 2**62],
        "zero": [0, c],
        "flat": [r * c],
        "extra_dim": [r, c, 1],
    }[kind]
    header[k]["shape"] = new
    return header, body, f"{k}.shape {old} -> {new}"


def _st_dtype(rng, header, body):
    k = rng.choice(tensor_names(header))
    old = header[k]["dtype"]
    header[k]["dtype"] = new = rng.choice(["I32", "U32", "F8_E4M3", "BOOL", "Q4", "f32", "F16"])
    return header, body, f"{k}.dtype {old} -> {new}"


def _st_len(rng, case):
    path = case.inputs[-1]
    header, body = read_st(path)
    raw_len = len(json.dumps(header).encode())
    n = rng.choice([0, 1, 2**64 - 1, 2**63, raw_len - 1, raw_len + 1, raw_len + len(body) + 1])
    write_st(path, header, body, n=n)
    return f"header length {n} (is {raw_len})"


def _st_not_utf8(rng, case):
    path = case.inputs[-1]
    header, body = read_st(path)
    raw = json.dumps(header).encode()
    i = rng.randrange(len(raw))
    raw = raw[:i] + rng.choice([b"\xff", b"\x00", b"\xc3"]) + raw[i + 1 :]
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return f"byte {i} of the header replaced"


def _st_missing_tensor(rng, header, body):
    k = rng.choice(tensor_names(header))
    del header[k]
    return header, body, f"no {k}"


def _st_extra_tensor(rng, header, body):
    k = rng.choice(tensor_names(header))
    header["model.layers.9.extra.weight"] = dict(header[k])
    return header, body, f"extra tensor aliasing {k}"


def _st_nan(rng, header, body):
    k = rng.choice([k for k in tensor_names(header) if header[k]["dtype"] == "F32"])
    b, e = header[k]["data_offsets"]
    arr = np.frombuffer(body, np.float32, (e - b) // 4, b).copy()
    arr[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
    body = body[:b] + arr.tobytes() + body[e:]
    return header, body, f"a NaN/inf in {k}"


def _st_truncate(rng, case):
    return _truncate(rng, Case(case.workdir, case.inputs[-1:], case.command))


def _st_dir(rng, case):
    return _to_dir(rng, Case(case.workdir, case.inputs[-1:], case.command))


def _st_empty(rng, case):
    case.inputs[-1].write_bytes(b"")
    return "empty file"


ST_MUTATORS = [
    Mutator("reorder_keys", "same", st_edit(_st_reorder)),
    Mutator("padded_header", "same", _st_padded),
    Mutator("extra_metadata", "same", st_edit(_st_metadata)),
    Mutator("header_not_object", "reject", st_edit(_st_header_type)),
    Mutator("tensor_info_not_object", "reject", st_edit(_st_info_type)),
    Mutator("metadata_wrong_type", "reject", st_edit(_st_metadata_type)),
    Mutator("drop_field", "reject", st_edit(_st_drop_field)),
    Mutator("field_wrong_type", "reject", st_edit(_st_field_type)),
    Mutator("bad_offsets", "reject", st_edit(_st_offsets)),
    Mutator("overlapping_offsets", "reject", st_edit(_st_overlap)),
    Mutator("bad_shape", "reject", st_edit(_st_shape)),
    Mutator("bad_dtype", "reject", st_edit(_st_dtype)),
    Mutator("header_length", "reject", _st_len),
    Mutator("header_not_utf8", "reject", _st_not_utf8),
    Mutator("missing_tensor", "reject", st_edit(_st_missing_tensor)),
    Mutator("extra_tensor", "reject", st_edit(_st_extra_tensor)),
    Mutator("nan_weight", "reject", st_edit(_st_nan)),
    Mutator("truncate", "reject", _st_truncate),
    Mutator("directory", "reject", _st_dir),
    Mutator("empty", "reject", _st_empty),
]


# ---------------------------------------------------------------- GGUF files


def build_gguf(
    out: Path,
    meta: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    tensors: Callable[[dict], dict] | None = None,
    types: dict[str, str] | None = None,
) -> Path:
    """The fixture model as a GGUF file (as tests/gguf_fixture.py writes it), with metadata
    overridden (``meta``: key -> (GGUFValueType name, value)) or dropped, and the tensors
    (GGUF names) passed through ``tensors``."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    from einplan.formats.tokenizer import byte_to_unicode

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from gguf_fixture import gguf_name, permute_qk

    cfg = json.loads((FIXTURE / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    fields: dict[str, tuple[str, Any]] = {
        "llama.block_count": ("UINT32", cfg["num_hidden_layers"]),
        "llama.context_length": ("UINT32", cfg["max_position_embeddings"]),
        "llama.embedding_length": ("UINT32", cfg["hidden_size"]),
        "llama.feed_forward_length": ("UINT32", cfg["intermediate_size"]),
        "llama.attention.head_count": ("UINT32", heads),
        "llama.attention.head_count_kv": ("UINT32", kv),
        "llama.rope.dimension_count": ("UINT32", cfg["head_dim"]),
        "llama.attention.layer_norm_rms_epsilon": ("FLOAT32", cfg["rms_norm_eps"]),
        "llama.rope.freq_base": ("FLOAT32", cfg["rope_parameters"]["rope_theta"]),
        "tokenizer.ggml.model": ("STRING", "gpt2"),
        "tokenizer.ggml.tokens": ("ARRAY", list(byte_to_unicode().values())),
        "tokenizer.ggml.merges": ("ARRAY", []),
        "tokenizer.ggml.token_type": ("ARRAY", [1] * 256),
        "tokenizer.ggml.eos_token_id": ("UINT32", 2),
    }
    fields.update(meta or {})
    arch = fields.pop("general.architecture", ("STRING", "llama"))[1]
    w = GGUFWriter(str(out), arch)
    for key, (kind, value) in fields.items():
        if key in drop:
            continue
        if kind == "ARRAY":
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, GGUFValueType[kind])
    ts = {}
    for name, arr in load_file(FIXTURE / "model.safetensors").items():
        if ".q_proj." in name:
            arr = permute_qk(arr, heads)
        elif ".k_proj." in name:
            arr = permute_qk(arr, kv)
        ts[gguf_name(name)] = arr
    if tensors is not None:
        ts = tensors(ts)
    for name, arr in ts.items():
        kind = (types or {}).get(name, "F32")
        t = GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, arr)
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_rebuild(fn: Callable[[random.Random], tuple[dict, str]]):
    def apply(rng: random.Random, case: Case) -> str:
        kw, detail = fn(rng)
        build_gguf(case.inputs[0], **kw)
        return detail

    return apply


META_KEYS = [
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.dimension_count",
]


def _gg_extra_meta(rng):
    return {"meta": {"general.name": ("STRING", "fuzz"), "x.y": ("UINT32", 5)}}, "extra metadata"


def _gg_f16(rng):
    # stored as F16: a lossy but legitimate encoding of the same model
    return {"types": {"token_embd.weight": "F16"}}, "embedding stored as F16"


def _gg_drop_meta(rng):
    k = rng.choice(META_KEYS + ["llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens"])
    return {"drop": (k,)}, f"no {k}"


def _gg_bad_meta(rng):
    k = rng.choice(META_KEYS)
    v = rng.choice([0, 1, 3, 7, 1000, 2**32 - 1])
    if k == "llama.context_length" and 0 < v < 64:
        # a shorter context is another valid model, not damage: eval then uses windows of
        # that length (and prints it), so its loss legitimately differs; keep the
        # values that are damage (0) or that must not change a 16-token eval
        v = rng.choice([0, 1000, 2**32 - 1])
    return {"meta": {k: ("UINT32", v)}}, f"{k} = {v}"


def _gg_meta_type(rng):
    k = rng.choice(META_KEYS + ["llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model"])
    kind, v = rng.choice([("STRING", "12"), ("FLOAT32", 2.5), ("INT32", -4), ("BOOL", True)])
    return {"meta": {k: (kind, v)}}, f"{k} = {kind} {v!r}"


def _gg_nonfinite_meta(rng):
    k = rng.choice(["llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"])
    v = rng.choice([float("nan"), float("inf"), -1.0, 0.0])
    return {"meta": {k: ("FLOAT32", v)}}, f"{k} = {v}"


def _gg_arch(rng):
    a = rng.choice(["gpt2", "qwen2", "mistral", ""])
    return {"meta": {"general.architecture": ("STRING", a)}}, f"architecture {a!r}"


def _gg_tokens(rng):
    kind = rng.choice(["eos_out_of_range", "few_tokens", "token_type_short", "tok_model"])
    meta = {
        "eos_out_of_range": {"tokenizer.ggml.eos_token_id": ("UINT32", 10**6)},
        "few_tokens": {"tokenizer.ggml.tokens": ("ARRAY", ["a", "b"])},
        "token_type_short": {"tokenizer.ggml.token_type": ("ARRAY", [1, 3])},
        "tok_model": {"tokenizer.ggml.model": ("STRING", "llama")},
    }[kind]
    return {"meta": meta}, kind


def _gg_tensor_shape(rng):
    name = rng.choice(["blk.0.attn_q.weight", "blk.1.ffn_up.weight", "token_embd.weight"])
    kind = rng.choice(["transposed", "extra_row", "flat"])
    if kind == "transposed" and name == "blk.0.attn_q.weight":
        # square: transposed it is a valid file of another model, which no reader can tell
        name = "blk.1.ffn_up.weight"

    def edit(ts):
        a = ts[name]
        ts[name] = {
            "transposed": np.ascontiguousarray(a.T),
            "extra_row": np.concatenate([a, a[:1]]),
            "flat": a.reshape(-1),
        }[kind]
        return ts

    return {"tensors": edit}, f"{name} {kind}"


def _gg_tensor_set(rng):
    kind = rng.choice(["missing", "extra", "unknown_name", "layer_out_of_range"])

    def edit(ts):
        if kind == "missing":
            del ts[rng.choice(sorted(ts))]
        elif kind == "extra":
            ts["output.weight"] = ts["token_embd.weight"].copy()
        elif kind == "unknown_name":
            ts["blk.0.attn_fused.weight"] = ts["blk.0.attn_q.weight"].copy()
        else:
            ts["blk.7.attn_q.weight"] = ts["blk.0.attn_q.weight"].copy()
        return ts

    return {"tensors": edit}, kind


def _gg_nan(rng):
    name = rng.choice(["blk.0.attn_q.weight", "output_norm.weight", "token_embd.weight"])

    def edit(ts):
        a = ts[name].copy()
        a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf])
        ts[name] = a
        return ts

    return {"tensors": edit}, f"NaN/inf in {name}"


def _gg_qtype(rng):
    t = rng.choice(["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16"])  # K-quants need 256 columns
    return {"types": {"blk.0.attn_v.weight": t}}, f"attn_v as {t}"


def gguf_layout(path: Path) -> dict[str, Any]:
    """Byte offsets of a GGUF file's header fields (read with gguf's reader)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    kvs = {}
    for name, f in r.fields.items():
        offs, pos = [], f.offset
        for p in f.parts:
            offs.append((pos, p.nbytes))
            pos += p.nbytes
        kvs[name] = offs
    tensors = []
    for t in r.tensors:
        offs, pos = [], t.field.offset
        for p in t.field.parts:
            offs.append((pos, p.nbytes))
            pos += p.nbytes
        tensors.append(offs)
    return {"kvs": kvs, "tensors": tensors, "data_offset": r.data_offset}


def _gg_bytes(rng, case):
    path = case.inputs[0]
    lay = gguf_layout(path)
    data = bytearray(path.read_bytes())
    kind = rng.choice(
        [
            "magic",
            "version",
            "tensor_count",
            "kv_count",
            "key_length",
            "value_type",
            "string_length",
            "array_length",
            "n_dims",
            "dim",
            "tensor_type",
            "tensor_offset",
        ]
    )

    def put(pos: int, fmt: str, value: int) -> None:
        data[pos : pos + struct.calcsize(fmt)] = struct.pack(fmt, value)

    if kind == "magic":
        data[0:4] = b"GGUX"
        detail = "magic GGUX"
    elif kind == "version":
        v = rng.choice([0, 1, 2, 4, 2**32 - 1])
        put(4, "<I", v)
        detail = f"version {v}"
    elif kind in ("tensor_count", "kv_count"):
        v = rng.choice([0, 1, 10**6, 2**63, 2**64 - 1])
        put(8 if kind == "tensor_count" else 16, "<Q", v)
        detail = f"{kind} {v}"
    elif kind in ("key_length", "value_type", "string_length", "array_length"):
        keys = [
            k
            for k, parts in lay["kvs"].items()
            if not k.startswith("GGUF.") and (kind != "array_length" or len(parts) > 5)
        ]
        if kind == "string_length":
            keys = [k for k in keys if len(lay["kvs"][k]) == 5]  # key, key bytes, type, len, str
        k = rng.choice(keys)
        parts = lay["kvs"][k]
        if kind == "key_length":
            v = rng.choice([0, 2**40, 2**64 - 1])
            put(parts[0][0], "<Q", v)
        elif kind == "value_type":
            v = rng.choice([13, 99, 2**32 - 1])
            put(parts[2][0], "<I", v)
        elif kind == "string_length":
            v = rng.choice([2**40, 2**64 - 1, 10**6])
            put(parts[3][0], "<Q", v)
        else:  # array: key_len, key, type, item type, count, items...
            v = rng.choice([0, 10**9, 2**63])
            put(parts[4][0], "<Q", v)
        detail = f"{k}: {kind} {v}"
    else:
        i = rng.randrange(len(lay["tensors"]))
        parts = lay["tensors"][i]  # name_len, name, n_dims, dims, type, offset
        if kind == "n_dims":
            v = rng.choice([0, 3, 5, 2**31])
            put(parts[2][0], "<I", v)
        elif kind == "dim":
            v = rng.choice([0, 1, 2**40, 2**63])
            put(parts[3][0], "<Q", v)
        elif kind == "tensor_type":
            v = rng.choice([4, 5, 99, 2**31])  # 4/5: removed Q4_2/Q4_3
            put(parts[4][0], "<I", v)
        else:
            v = rng.choice([3, 2**40, 2**63])
            put(parts[5][0], "<Q", v)
        detail = f"tensor {i}: {kind} {v}"
    path.write_bytes(bytes(data))
    return detail


def _gg_truncate(rng, case):
    path = case.inputs[0]
    data = path.read_bytes()
    n = rng.choice([0, 3, 20, rng.randrange(len(data)), len(data) - 1])
    path.write_bytes(data[:n])
    return f"truncated to {n} of {len(data)} bytes"


GGUF_MUTATORS = [
    Mutator("extra_metadata", "same", gguf_rebuild(_gg_extra_meta)),
    Mutator("f16_tensor", "any", gguf_rebuild(_gg_f16)),
    Mutator("drop_metadata", "reject", gguf_rebuild(_gg_drop_meta)),
    Mutator("bad_metadata_value", "reject", gguf_rebuild(_gg_bad_meta)),
    Mutator("metadata_wrong_type", "reject", gguf_rebuild(_gg_meta_type)),
    Mutator("nonfinite_metadata", "reject", gguf_rebuild(_gg_nonfinite_meta)),
    Mutator("architecture", "reject", gguf_rebuild(_gg_arch)),
    Mutator("tokenizer_fields", "reject", gguf_rebuild(_gg_tokens)),
    Mutator("tensor_shape", "reject", gguf_rebuild(_gg_tensor_shape)),
    Mutator("tensor_set", "reject", gguf_rebuild(_gg_tensor_set)),
    Mutator("nan_tensor", "reject", gguf_rebuild(_gg_nan)),
    Mutator("tensor_type", "any", gguf_rebuild(_gg_qtype)),
    Mutator("header_bytes", "reject", _gg_bytes),
    Mutator("header_bytes2", "reject", _gg_bytes),
    Mutator("truncate", "reject", _gg_truncate),
    Mutator("directory", "reject", _to_dir),
]


# ---------------------------------------------------------------- training checkpoints


def ckpt_dir(case: Case) -> Path:
    return case.workdir / "run" / "checkpoints" / "latest"


def manifest_edit(fn: Callable[[random.Random, dict], str]):
    def apply(rng: random.Random, case: Case) -> str:
        m = ckpt_dir(case) / "trainer.json"
        doc = json.loads(m.read_text())
        detail = fn(rng, doc)
        write_json(m, doc, indent=1)
        return detail

    return apply


def relist(folder: Path) -> None:
    """Update the manifest's sizes and hashes to the files as they are now (a "torn" file
    the manifest agrees with)."""
    from einplan.formats.files import hash_file

    m = folder / "trainer.json"
    doc = json.loads(m.read_text())
    for name in list(doc["files"]):
        p = folder / name
        if p.is_file():
            doc["files"][name] = {"bytes": p.stat().st_size, "sha256": hash_file(p)}
        else:
            del doc["files"][name]
    write_json(m, doc, indent=1)


def _ck_reindent(rng, doc):
    return "manifest re-indented"


def _ck_empty_files(rng, doc):
    doc["files"] = {}
    return "files: {}"


def _ck_files_type(rng, doc):
    doc["files"] = rng.choice([[], "x", None, {"model.safetensors": 5}, {"model.safetensors": {}}])
    return f"files = {doc['files']!r}"


def _ck_step(rng, doc):
    k = rng.choice(["step", "counters.step", "counters.updates"])
    v = rng.choice([7, -1, "2", 2.5, None, 10**12])  # the checkpoint is of step 4
    if k == "step":
        doc["step"] = v
    else:
        doc["counters"][k.split(".")[1]] = v
    return f"{k} = {v!r}"


def _ck_drop(rng, doc):
    p = rng.choice([p for p in json_paths(doc) if len(p) <= 2 and p[0] != "files"])
    del_path(doc, p)
    return f"no {show(p)}"


def _ck_wrong_type(rng, doc):
    p = rng.choice([p for p in json_paths(doc) if p[0] != "files"])
    v = other_type(rng, get_path(doc, p))
    set_path(doc, p, v)
    return f"{show(p)} = {v!r}"


def _ck_train_value(rng, doc):
    k = rng.choice(sorted(k for k, v in doc["train"].items() if isinstance(v, int | float)))
    v = rng.choice([float("nan"), float("inf"), -1, 0, 10**12])
    doc["train"][k] = v
    return f"train.{k} = {v!r}"


def _ck_torn_manifest(rng, case):
    m = ckpt_dir(case) / "trainer.json"
    data = m.read_bytes()
    n = rng.choice([0, rng.randrange(len(data))])
    m.write_bytes(data[:n])
    return f"trainer.json truncated to {n} bytes"


def _ck_manifest_not_object(rng, case):
    m = ckpt_dir(case) / "trainer.json"
    m.write_text(rng.choice(["[]", "null", "5", '"x"', "NaN"]))
    return f"trainer.json = {m.read_text()}"


def _ck_latest(rng, case):
    root = case.workdir / "run" / "checkpoints"
    latest = root / "latest"
    target = os.readlink(latest)
    kind = rng.choice(["missing", "dangling", "to_file", "real_dir", "loop"])
    latest.unlink()
    if kind == "dangling":
        latest.symlink_to("step-000099")
    elif kind == "to_file":
        latest.symlink_to(f"{target}/trainer.json")
    elif kind == "real_dir":
        shutil.copytree(root / target, latest)
    elif kind == "loop":
        latest.symlink_to("latest")
    return f"latest: {kind}"


def _ck_latest_older(rng, case):
    """``latest`` pointing at an older step than the newest folder. Not damage: ``latest`` is
    the record of the newest complete checkpoint (a run killed after renaming a new step
    folder into place but before moving the link leaves exactly this, and the next save
    replaces that folder), and a user may point it back to resume from an earlier step. So
    resuming from where it points is right, and the losses legitimately differ from the
    pristine resume (expect "any": finite, no traceback, inputs kept on failure)."""
    root = case.workdir / "run" / "checkpoints"
    latest = root / "latest"
    target = os.readlink(latest)
    older = sorted(p.name for p in root.glob("step-*") if p.name != target)
    latest.unlink()
    latest.symlink_to(older[0] if older else "step-000099")
    return f"latest: to_older ({older[0] if older else 'none'})"


def _ck_file(rng, case):
    """A damaged checkpoint file, with the manifest left alone (its hash must catch it)."""
    d = ckpt_dir(case)
    name = rng.choice(["model.safetensors", "optimizer.safetensors", "config.json"])
    p = d / name
    kind = rng.choice(["truncated", "flipped", "deleted", "directory"])
    if kind == "truncated":
        p.write_bytes(p.read_bytes()[: rng.randrange(p.stat().st_size)])
    elif kind == "flipped":
        data = bytearray(p.read_bytes())
        data[rng.randrange(len(data))] ^= 0x40
        p.write_bytes(bytes(data))
    elif kind == "deleted":
        p.unlink()
    else:
        p.unlink()
        p.mkdir()
    return f"{name} {kind}"


def _ck_torn_resigned(rng, case):
    """A truncated tensor file whose size and hash the manifest agrees with."""
    d = ckpt_dir(case)
    name = rng.choice(["model.safetensors", "optimizer.safetensors"])
    p = d / name
    n = rng.randrange(p.stat().st_size)
    p.write_bytes(p.read_bytes()[:n])
    relist(d)
    return f"{name} truncated to {n} bytes, manifest updated"


def _ck_st_resigned(rng, case):
    """A safetensors mutation of the checkpoint's model or optimizer file, manifest updated."""
    d = ckpt_dir(case)
    name = rng.choice(["model.safetensors", "optimizer.safetensors"])
    m = rng.choice([m for m in ST_MUTATORS if m.expect == "reject" and m.name != "directory"])
    detail = m.apply(rng, Case(case.workdir, [d / name], case.command))
    relist(d)
    return f"{name}: {m.name} ({detail}), manifest updated"


def _ck_config_resigned(rng, case):
    d = ckpt_dir(case)
    cfg = json.loads((d / "config.json").read_text())
    k = rng.choice(["hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps"])
    cfg[k] = rng.choice([cfg[k] * 2, 0, float("nan")])
    (d / "config.json").write_text(json.dumps(cfg))
    relist(d)
    return f"config.json {k} = {cfg[k]!r}, manifest updated"


def _ck_metrics(rng, case):
    m = case.workdir / "run" / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    kind = rng.choice(["torn_last_line", "garbage_line", "deleted", "empty"])
    if kind == "torn_last_line":
        m.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    elif kind == "garbage_line":
        m.write_text("".join(lines[:1]) + "{not json\n" + "".join(lines[1:]))
    elif kind == "deleted":
        m.unlink()
    else:
        m.write_text("")
    return f"metrics.jsonl {kind}"


def _ck_extra_file(rng, case):
    (ckpt_dir(case) / "notes.txt").write_text("not in the manifest")
    return "extra file in the checkpoint folder"


CKPT_MUTATORS = [
    Mutator("reindent_manifest", "same", manifest_edit(_ck_reindent)),
    Mutator("extra_file", "same", _ck_extra_file),
    Mutator("metrics_jsonl", "same", _ck_metrics),
    Mutator("empty_file_list", "same", manifest_edit(_ck_empty_files)),
    Mutator("file_list_wrong_type", "reject", manifest_edit(_ck_files_type)),
    Mutator("step_value", "reject", manifest_edit(_ck_step)),
    Mutator("manifest_drop_key", "reject", manifest_edit(_ck_drop)),
    Mutator("manifest_wrong_type", "reject", manifest_edit(_ck_wrong_type)),
    Mutator("train_settings_value", "reject", manifest_edit(_ck_train_value)),
    Mutator("torn_manifest", "reject", _ck_torn_manifest),
    Mutator("manifest_not_object", "reject", _ck_manifest_not_object),
    Mutator("latest_link", "reject", _ck_latest),
    Mutator("damaged_file", "reject", _ck_file),
    Mutator("torn_file_resigned", "reject", _ck_torn_resigned),
    Mutator("safetensors_resigned", "reject", _ck_st_resigned),
    Mutator("config_resigned", "reject", _ck_config_resigned),
    Mutator("latest_older", "any", _ck_latest_older),
]


# ---------------------------------------------------------------- configs


def config_edit(fn: Callable[[random.Random, dict], str]):
    def apply(rng: random.Random, case: Case) -> str:
        path = case.inputs[0]
        doc = json.loads(path.read_text())
        detail = fn(rng, doc)
        write_json(path, doc)
        return detail

    return apply


SIZE_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "max_batch",
]


def _cf_reformat(rng, doc):
    items = list(doc.items())
    rng.shuffle(items)
    doc.clear()
    doc.update(items)
    return "keys shuffled"


def _cf_float_int(rng, doc):
    k = rng.choice(SIZE_KEYS)
    doc[k] = float(doc[k])
    return f"{k} = {doc[k]!r}"


def _cf_unknown(rng, doc):
    k = rng.choice(["hiden_size", "foo", "train.lrr"])
    if k.startswith("train."):
        doc["train"][k[6:]] = 1
    else:
        doc[k] = 3
    return f"unknown key {k}"


def _cf_wrong_type(rng, doc):
    p = rng.choice(json_paths(doc))
    v = other_type(rng, get_path(doc, p))
    set_path(doc, p, v)
    return f"{show(p)} = {v!r}"


def _cf_size(rng, doc):
    k = rng.choice(SIZE_KEYS)
    v = rng.choice([0, -1, -64, 10**12, 2**63, 2**31, 1.5])
    doc[k] = v
    return f"{k} = {v!r}"


def _cf_float(rng, doc):
    k = rng.choice(["rms_norm_eps", "rope_theta"])
    v = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e308, 1e-320])
    doc[k] = v
    return f"{k} = {v!r}"


def _cf_divisibility(rng, doc):
    kind = rng.choice(["heads", "kv", "head_dim_odd"])
    if kind == "heads":
        doc["num_attention_heads"] = 3
    elif kind == "kv":
        doc["num_key_value_heads"] = 3
    else:
        doc["head_dim"] = 7
    return kind


def _cf_model_type(rng, doc):
    v = rng.choice(["gpt2", "", "LLAMA", 5, None, "bert"])
    doc["model_type"] = v
    return f"model_type = {v!r}"


def _cf_drop(rng, doc):
    k = rng.choice(SIZE_KEYS[:5])
    del doc[k]
    return f"no {k}"


def _cf_drop_optional(rng, doc):
    """A key with a default (num_key_value_heads: as many as the heads, as in transformers)."""
    k = rng.choice(SIZE_KEYS[5:] + ["name", "train", "tie_word_embeddings"])
    del doc[k]
    return f"no {k}"


def _cf_train(rng, doc):
    k = rng.choice(sorted(doc["train"]))
    old = doc["train"][k]
    if isinstance(old, int | float):
        v = rng.choice([float("nan"), -1, 0, 10**12, "x"])
    else:
        v = other_type(rng, old)
    doc["train"][k] = v
    return f"train.{k} = {v!r}"


def _cf_rope_scaling(rng, doc):
    doc["rope_scaling"] = rng.choice(
        [
            {"rope_type": "llama3", "factor": float("nan")},
            {"rope_type": "bogus"},
            {"rope_type": "llama3", "factor": -2.0, "low_freq_factor": 1, "high_freq_factor": 4},
            "linear",
            [1],
            {"rope_type": "llama3"},
        ]
    )
    return f"rope_scaling = {doc['rope_scaling']!r}"


def _cf_not_object(rng, case):
    return _not_json(rng, case)


CONFIG_MUTATORS = [
    Mutator("key_order", "same", config_edit(_cf_reformat)),
    Mutator("int_as_float", "same", config_edit(_cf_float_int)),
    Mutator("unknown_key", "reject", config_edit(_cf_unknown)),
    Mutator("wrong_type", "reject", config_edit(_cf_wrong_type)),
    Mutator("bad_size", "reject", config_edit(_cf_size)),
    Mutator("bad_size2", "reject", config_edit(_cf_size)),
    Mutator("nonfinite_float", "reject", config_edit(_cf_float)),
    Mutator("divisibility", "reject", config_edit(_cf_divisibility)),
    Mutator("model_type", "reject", config_edit(_cf_model_type)),
    Mutator("drop_required", "reject", config_edit(_cf_drop)),
    Mutator("drop_optional", "any", config_edit(_cf_drop_optional)),
    Mutator("train_section", "reject", config_edit(_cf_train)),
    Mutator("rope_scaling", "reject", config_edit(_cf_rope_scaling)),
    Mutator("not_an_object", "reject", _cf_not_object),
    Mutator("truncate", "reject", _truncate),
    Mutator("directory", "reject", _to_dir),
]

MUTATORS = {
    "plan": PLAN_MUTATORS,
    "safetensors": ST_MUTATORS,
    "gguf": GGUF_MUTATORS,
    "checkpoint": CKPT_MUTATORS,
    "config": CONFIG_MUTATORS,
}


# ---------------------------------------------------------------- the fuzzer


@dataclass
class Fuzzer:
    """Pristine inputs made once under ``root``; each case copies and mutates them."""

    root: Path
    timeout: float = 10.0
    memory_headroom: int = 3 << 30
    baselines: dict[str, str] = field(default_factory=dict)

    def setup(self) -> None:
        from einplan.cli import main

        os.environ.setdefault("EINPLAN_CACHE_DIR", str(self.root / "path-cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        base = self.root / "pristine"
        base.mkdir(parents=True, exist_ok=True)
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet, contextlib.redirect_stderr(io.StringIO()):
            cfg = base / "micro.json"
            fwd = {k: v for k, v in MICRO.items() if k != "train"}
            write_json(cfg, fwd)
            assert main(["compile", str(cfg), "-o", str(base / "micro.plan")]) == 0
            write_json(base / "micro-train.json", MICRO)
            train_plan = base / "micro-train.plan"
            assert (
                main(["compile", str(base / "micro-train.json"), "--train", "-o", str(train_plan)])
                == 0
            )
            run = base / "run"
            assert main(self.train_argv(train_plan, run, 4, resume=False)) == 0
            # the fixture model: its plan and weights folder (safetensors), and as GGUF
            weights = base / "weights"
            weights.mkdir(exist_ok=True)
            shutil.copy(FIXTURE / "config.json", weights / "config.json")
            shutil.copy(FIXTURE / "model.safetensors", weights / "model.safetensors")
            assert main(["compile", str(FIXTURE / "config.json"), "-o", str(base / "fx.plan")]) == 0
            build_gguf(base / "model.gguf")
        self.base = base
        for cls in CLASSES:
            for variant in range(self.variants(cls)):
                case = self.fresh(cls, f"baseline-{cls}-{variant}", variant)
                r = self.execute(case)
                assert r.outcome == "ok", f"baseline {cls}/{variant} failed: {r.message}"
                self.baselines[f"{cls}/{variant}"] = r.message

    @staticmethod
    def train_argv(plan: Path, out: Path, steps: int, resume: bool) -> list[str]:
        argv = ["train", str(plan), "--data", str(CORPUS), "--out", str(out)]
        return [*argv, "--steps", str(steps), *(["--resume"] if resume else [])]

    @staticmethod
    def variants(cls: str) -> int:
        """How many commands read a class (each case uses ``seed % variants``)."""
        return {"plan": 3, "safetensors": 2, "gguf": 2, "checkpoint": 1, "config": 1}[cls]

    def fresh(self, cls: str, name: str, variant: int) -> Case:
        """A copy of the pristine inputs of ``cls`` and the command that reads them."""
        d = self.root / "cases" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        b = self.base
        if cls == "plan":
            plan = d / "micro.plan"
            shutil.copy(b / "micro.plan", plan)
            cmd = [
                Command(["eval", str(plan), "--random-weights", "0", *EVAL], eval_signature),
                Command(
                    ["run", str(plan), "--random-weights", "0", "--tokenizer", "bytes"]
                    + ["--prompt", "ROMEO:", "--max-new-tokens", "4"],
                    generated_signature,
                ),
                Command(["graph", str(plan)], graph_signature),
            ][variant]
            return Case(d, [plan], cmd)
        if cls == "safetensors":
            shutil.copytree(b / "weights", d / "weights")
            plan = d / "fx.plan"
            shutil.copy(b / "fx.plan", plan)
            st = d / "weights" / "model.safetensors"
            target = [d / "weights", st][variant]
            cmd = Command(["eval", str(plan), "--weights", str(target), *EVAL], eval_signature)
            return Case(d, [plan, st], cmd)
        if cls == "gguf":
            g = d / "model.gguf"
            shutil.copy(b / "model.gguf", g)
            plan = d / "fx.plan"
            shutil.copy(b / "fx.plan", plan)
            # convert, then load what it wrote: a converted folder is right if a plan of its
            # config gives the pristine loss with its weights, or is refused clearly
            hf = d / "hf"
            use = Command(["eval", str(d / "hf.plan"), "--weights", str(hf), *EVAL], eval_signature)
            load = Command(
                ["compile", str(hf / "config.json"), "-o", str(d / "hf.plan")], none, use
            )
            cmd = [
                Command(["convert", str(g), "-o", str(hf)], folder_signature, load),
                Command(["eval", str(plan), "--weights", str(g), *EVAL], eval_signature),
            ][variant]
            return Case(d, [g, plan], cmd)
        if cls == "checkpoint":
            shutil.copytree(b / "run", d / "run", symlinks=True)
            plan = d / "micro-train.plan"
            shutil.copy(b / "micro-train.plan", plan)
            argv = self.train_argv(plan, d / "run", 5, resume=True)
            return Case(d, [plan, d / "run"], Command(argv, train_signature))
        if cls == "config":
            cfg = d / "config.json"
            shutil.copy(b / "micro-train.json", cfg)
            plan = d / "out.plan"
            then = Command(["eval", str(plan), "--random-weights", "0", *EVAL], eval_signature)
            cmd = Command(["compile", str(cfg), "-o", str(plan)], none, then)
            return Case(d, [cfg], cmd)
        raise ValueError(cls)

    def execute(self, case: Case) -> Result:
        """Run the case's command(s); outcome and signature (in ``message`` when ok)."""
        res = Result("", 0, "", case.detail, "", " ".join(case.command.argv))
        before = snapshot(case.inputs)
        cmd: Command | None = case.command
        t0 = time.perf_counter()
        while cmd is not None:
            res.argv = short_argv(cmd.argv, case.workdir)
            with memory_limit(self.memory_headroom):
                run = run_cli(cmd.argv, self.timeout)
            if run.hang:
                res.outcome, res.message = "hang", f"no result after {self.timeout:.0f} s"
                break
            if run.code is None or run.code not in (0, 2):
                res.outcome = "traceback"
                res.message = run.exc or f"exit {run.code}: {run.err.strip()[-200:]}"
                res.where = run.where
                break
            if run.code == 2:
                line = run.err.strip().splitlines()[-1] if run.err.strip() else ""
                first = next((x for x in run.err.splitlines() if "error:" in x), line)
                clear = first.startswith("einplan: error:") or (
                    first.startswith("einplan ") and ": error:" in first
                )
                res.outcome = "clear_error" if clear else "traceback"
                res.message = (first or "exit 2 without a message")[:300]
                break
            try:
                sig = cmd.signature(run, case.workdir / "hf")
            except Exception as e:  # noqa: BLE001 - an unreadable result is a wrong one
                sig = f"unreadable result: {type(e).__name__}: {e}"
            res.outcome, res.message = "ok", sig
            cmd = cmd.then
        res.seconds = time.perf_counter() - t0
        # a failed command must leave its inputs alone; so must a successful one, except a
        # resumed training run, which writes into its run folder
        writes_inputs = res.outcome == "ok" and any(p.name == "run" for p in case.inputs)
        after = snapshot(case.inputs)
        if after != before and not writes_inputs:
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            res.message = (
                f"{res.outcome}, and changed/deleted input(s) "
                f"{', '.join(Path(c).name for c in changed)[-200:]}: {res.message}"
            )
            res.outcome = "data_loss"
        return res

    def case(self, cls: str, seed: int) -> Result:
        """Mutate a fresh copy of the inputs of ``cls`` by seed ``seed`` and run it."""
        muts = MUTATORS[cls]
        mut = muts[seed % len(muts)]
        rng = random.Random(f"{cls}:{seed}")
        variant = (seed // len(muts)) % self.variants(cls)
        c = self.fresh(cls, f"{cls}-{seed}", variant)
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                c.detail = mut.apply(rng, c)
        except Exception as e:  # noqa: BLE001 - a mutator that does not apply
            c.detail = f"mutator failed: {type(e).__name__}: {e}"
            r = Result(cls, seed, mut.name, c.detail, mut.expect, "", "ok", "mutator skipped")
            return r
        r = self.execute(c)
        expect = c.expect or mut.expect
        r.cls, r.seed, r.mutation, r.expect, r.detail = cls, seed, mut.name, expect, c.detail
        if r.outcome == "ok":
            base = self.baselines[f"{cls}/{variant}"]
            sig = r.message
            if nonfinite(sig):
                r.outcome, r.message = "silent_wrong", f"non-finite result: {sig[:200]}"
            elif expect in ("same", "reject") and sig != base:
                r.outcome = "silent_wrong"
                r.message = f"result {sig[:120]!r} != pristine {base[:120]!r}"
            else:
                r.message = "accepted" + (" (same result)" if sig == base else "")
        shutil.rmtree(c.workdir, ignore_errors=True)
        return r


def fuzz(
    root: Path,
    per_class: int,
    classes: tuple[str, ...] = CLASSES,
    budget: float = math.inf,
    timeout: float = 10.0,
    first_seed: int = 0,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """``per_class`` seeded cases of every class, round-robin, until the budget is spent."""
    t_end = time.perf_counter() + budget
    fz = Fuzzer(Path(root), timeout=timeout)
    fz.setup()
    results = []
    for seed in range(first_seed, first_seed + per_class):
        for cls in classes:
            if time.perf_counter() > t_end:
                return results
            r = fz.case(cls, seed)
            results.append(r)
            if progress:
                progress(r)
    return results


def table(results: list[Result]) -> dict[str, dict[str, int]]:
    """Counts of outcomes by input class."""
    out = {cls: dict.fromkeys(OUTCOMES, 0) for cls in CLASSES}
    for r in results:
        out[r.cls][r.outcome] += 1
    return {k: v for k, v in out.items() if sum(v.values())}


def as_dicts(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]
