"""The plan file: versioned JSON holding the compiled graphs (entry points) of one model.

Data only, never pickle: a magic string, ``plan_version``, the engine version, the config
and its hash, and per entry the nodes with their lowering recipes and schedule annotations.
A checksum over the body tells a damaged file from a foreign one; a body with a valid checksum
is still checked (JSON types, known ops and tags, then :meth:`Graph.verify`), so an edited plan
is refused naming its entry and node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from einplan._version import __version__
from einplan.compiler.attrs import (
    INPUT_ABSMAX,
    LoraPart,
    MatmulRecipe,
    PackMember,
    QMatmulRecipe,
    QuantPart,
    Recipe,
    StepSchedule,
    UnaryRecipe,
)
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS, Op
from einplan.compiler.symbolic import numel, scale_poly
from einplan.compiler.tags import Tag
from einplan.errors import EinplanError

OP_NAMES = frozenset(op.value for op in Op)
TAG_NAMES = frozenset(tag.value for tag in Tag)
MAGIC = "einplan-plan"
PLAN_VERSION = 1


class PlanError(EinplanError):
    """A file is not a plan, is damaged, or was written by an incompatible version."""


@dataclass
class Plan:
    """Compiled entry points of one model plus the config they came from."""

    config: dict[str, Any]
    entries: dict[str, Graph]
    meta: dict[str, Any] = field(default_factory=dict)

    def entry(self, name: str = "forward") -> Graph:
        """Return one entry point, or a clear error listing those present."""
        if name not in self.entries:
            raise PlanError(f"plan has no entry {name!r} (it has: {', '.join(self.entries)})")
        return self.entries[name]

    def to_json(self) -> dict[str, Any]:
        """Return the plan as a JSON-ready document."""
        body = {
            "engine_version": __version__,
            "config": self.config,
            "config_hash": hash_config(self.config),
            "meta": self.meta,
            "entries": {k: graph_to_json(g) for k, g in self.entries.items()},
        }
        return {
            "magic": MAGIC,
            "plan_version": PLAN_VERSION,
            "checksum": checksum(body),
            "body": body,
        }

    def save(self, path: str | Path) -> None:
        """Write the plan file atomically (temp file + rename), with a plain file's mode
        (0666 less the umask). formats.files.write_atomic does the same for every other
        output; the compiler sits below formats, so the plan keeps its own copy."""
        path = Path(path)
        tmp, fd = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp", None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:
            raise EinplanError(f"cannot write {path}: {e.strerror or e}") from e
        finally:
            if fd is not None:
                tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file, refusing foreign, damaged or other-version files by name."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(
                f"plan file {str(path)!r} not found (make one with: einplan compile "
                f"CONFIG -o {path.name})"
            )
        try:
            doc = json.loads(path.read_bytes(), parse_constant=refuse_non_finite)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise PlanError(
                f"{path}: not an einplan plan file (not JSON: {why}) or damaged; "
                "recompile it with einplan compile"
            ) from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise PlanError(f"{path}: not an einplan plan file (no '{MAGIC}' magic)")
        if doc.get("plan_version") != PLAN_VERSION:
            raise PlanError(
                f"{path}: plan format version {doc.get('plan_version')!r}, this "
                f"einplan {__version__} reads version {PLAN_VERSION}; recompile it"
            )
        body = doc.get("body")
        if not isinstance(body, dict) or doc.get("checksum") != checksum(body):
            raise PlanError(f"{path}: plan file is damaged (checksum mismatch); recompile it")
        config, meta, raw = body.get("config"), body.get("meta", {}), body.get("entries")
        if not isinstance(config, dict) or not isinstance(meta, dict) or not isinstance(raw, dict):
            raise PlanError(
                f"{path}: plan file is malformed (config, meta, entries must be objects)"
            )
        return cls(config, {name: load_entry(path, name, g) for name, g in raw.items()}, meta)

    @property
    def parameters(self) -> int:
        """Parameters of the model (as ``einplan compile`` prints them)."""
        return self.meta["parameters"]


def is_plan_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts as a plan does (its magic in the first key), so
    that a command taking "a plan or a config" can tell them apart without parsing either;
    whitespace is allowed, as any JSON writer may add it."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(256)
    return re.match(rb'\s*\{\s*"magic"\s*:\s*"' + MAGIC.encode() + b'"', head) is not None


def refuse_non_finite(name: str) -> float:
    """JSON reader hook: a plan never holds NaN or infinity (an attribute such as a rotary
    frequency that is not finite would make every logit NaN), so such a number is damage."""
    raise json.JSONDecodeError(f"non-finite number {name}", name, 0)


def checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the plan body."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def hash_config(config: dict[str, Any]) -> str:
    """Short hash naming the config a plan was compiled from."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def node_to_json(n: Node) -> dict[str, Any]:
    """Serialise one node."""
    d = {
        "id": n.id,
        "op": n.op.value,
        "in": list(n.inputs),
        "shape": list(n.shape),
        "dtype": n.dtype,
        "name": n.name,
    }
    if n.attrs:
        d["attrs"] = attrs_to_json(n.attrs)
    if n.tags:
        d["tags"] = [str(t) for t in sorted(n.tags)]
    return d


def load_entry(path: Path, name: str, raw: Any) -> Graph:
    """One entry of a plan file, read and verified; anything wrong is a :class:`PlanError`
    naming the file, the entry and (where it lies in one) the node."""
    try:
        graph = graph_from_json(expect(raw, dict, "the entry"))
        graph.verify()
        check_lowering(graph)
        check_schedule(graph)
    except KeyError as e:
        raise PlanError(f"{path}: entry {name!r}: missing field {e}; recompile it") from None
    except (TypeError, ValueError) as e:  # PlanError and ShapeError among them
        raise PlanError(f"{path}: entry {name!r}: {e}; recompile it") from None
    return graph


def expect(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` when it has one of the JSON ``types`` (a bool is no int), else a PlanError."""
    if type(value) is types:  # the common case, fast
        return value
    wanted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        names = " or ".join(t.__name__ for t in wanted)
        raise PlanError(f"{what} must be {names}, got {type(value).__name__} {value!r:.40}")
    return value


def expect_ids(values: Any, what: str) -> tuple[int, ...]:
    """A JSON list of value ids as a tuple of ints."""
    if type(values) is list and all(type(v) is int for v in values):
        return tuple(values)
    return tuple(expect(v, int, what) for v in expect(values, list, what))


def node_from_json(d: dict[str, Any]) -> Node:
    """Read one node written by :func:`node_to_json`, checking its JSON types and that its
    op and tags are known."""
    expect(d, dict, "a node")
    where = f"node %{expect(d['id'], int, 'a node id')}"
    op, tags = expect(d["op"], str, f"{where} op"), expect(d.get("tags", []), list, f"{where} tags")
    if op not in OP_NAMES:
        raise PlanError(f"{where}: unknown op {op!r}")
    unknown = [t for t in tags if t not in TAG_NAMES]
    if unknown:
        raise PlanError(f"{where}: unknown tag(s) {unknown}")
    shape = tuple(expect(x, (int, str), f"{where} shape") for x in expect(d["shape"], list, where))
    return Node(
        d["id"],
        Op(op),
        expect_ids(d["in"], f"{where} inputs"),
        attrs_from_json(expect(d.get("attrs", {}), dict, f"{where} attrs")),
        shape,
        expect(d["dtype"], str, f"{where} dtype"),
        expect(d["name"], str, f"{where} name"),
        frozenset(Tag(t) for t in tags),
    )


RECIPE_KINDS: dict[str, type[Recipe]] = {
    "unary": UnaryRecipe,
    "matmul": MatmulRecipe,
    "qmatmul": QMatmulRecipe,
}
KIND_OF_RECIPE = {cls: kind for kind, cls in RECIPE_KINDS.items()}


def attrs_to_json(attrs: dict[str, Any]) -> dict[str, Any]:
    """A node's attrs with the typed ones (quant, lora, pack, recipe) as plain JSON."""
    out = dict(attrs)
    if "quant" in attrs:
        out["quant"] = quant_to_json(attrs["quant"])
    if "lora" in attrs:
        out["lora"] = dataclasses.asdict(attrs["lora"])
    if "pack" in attrs:
        out["pack"] = [pack_member_to_json(m) for m in attrs["pack"]]
    if "recipe" in attrs:
        r = attrs["recipe"]
        out["recipe"] = {"kind": KIND_OF_RECIPE[type(r)], **dataclasses.asdict(r)}
    return out


def attrs_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """Read attrs written by :func:`attrs_to_json`."""
    out = dict(d)
    if "quant" in d:
        out["quant"] = quant_from_json(expect(d["quant"], dict, "attrs.quant"))
    if "lora" in d:
        out["lora"] = LoraPart(**expect(d["lora"], dict, "attrs.lora"))
    if "pack" in d:
        members = expect(d["pack"], list, "attrs.pack")
        out["pack"] = tuple(PackMember(*expect(m, list, "attrs.pack member")) for m in members)
    if "recipe" in d:
        fields = dict(expect(d["recipe"], dict, "attrs.recipe"))
        kind = fields.pop("kind", None)
        if kind not in RECIPE_KINDS:
            raise PlanError(f"attrs.recipe kind {kind!r:.40} is not one of {sorted(RECIPE_KINDS)}")
        out["recipe"] = RECIPE_KINDS[kind](**fields)
    return out


def quant_to_json(q: QuantPart) -> dict[str, Any]:
    """A quantised param's part as the plan file holds it (a scale only its part, bits, key)."""
    if q.part == INPUT_ABSMAX:
        return {"part": q.part, "bits": q.bits, "of": q.of}
    return {
        "bits": q.bits,
        "group": q.group,
        "symmetric": q.symmetric,
        "of": q.of,
        "shape": list(q.shape),
        "part": q.part,
    }


def quant_from_json(d: dict[str, Any]) -> QuantPart:
    """Read a part written by :func:`quant_to_json`."""
    shape = tuple(expect(d["shape"], list, "attrs.quant.shape")) if "shape" in d else None
    return QuantPart(d["part"], d["bits"], d["of"], d.get("group"), d.get("symmetric"), shape)


def pack_member_to_json(m: PackMember) -> list[Any]:
    """``[key, rows]``, or ``[key, rows, of]`` for a quantised part."""
    return [m.key, m.rows] if m.of is None else [m.key, m.rows, m.of]


def schedule_to_json(a: StepSchedule) -> dict[str, Any]:
    """A step's schedule; ``slot`` and ``free_after`` only once the memory pass set them."""
    d: dict[str, Any] = {"level": a.level, "thread": a.thread}
    if a.free_after is not None:
        d.update(slot=a.slot, free_after=list(a.free_after))
    return d


SCHEDULE_FIELDS = frozenset({"level", "thread", "slot", "free_after"})


def schedule_from_json(d: dict[str, Any], what: str = "an annotation") -> StepSchedule:
    """Read a schedule written by :func:`schedule_to_json`, checking its JSON types."""
    expect(d, dict, what)
    if not SCHEDULE_FIELDS.issuperset(d):
        raise PlanError(f"{what}: unknown field(s) {sorted(set(d) - SCHEDULE_FIELDS)}")
    level, thread = (
        expect(d["level"], int, f"{what} level"),
        expect(d["thread"], int, f"{what} thread"),
    )
    slot, free = d.get("slot"), d.get("free_after")
    if slot is not None:
        expect(slot, int, f"{what} slot")
    free_after = None if free is None else expect_ids(free, f"{what} free_after")
    return StepSchedule(level, thread, slot, free_after)


def graph_to_json(g: Graph) -> dict[str, Any]:
    """Serialise a graph with its annotations and meta."""
    return {
        "name": g.name,
        "dims": g.dims,
        "outputs": g.outputs,
        "nodes": [node_to_json(n) for n in g.nodes],
        "annotations": {str(k): schedule_to_json(v) for k, v in g.annotations.items()},
        "meta": g.meta,
        "effects": g.effects,
    }


def graph_from_json(d: dict[str, Any]) -> Graph:
    """Read a graph written by :func:`graph_to_json`."""
    outputs = expect(d["outputs"], dict, "outputs")
    dims = expect(d["dims"], dict, "dims")
    for k, v in dims.items():
        if expect(v, int, f"dims.{k}") < 1:
            raise PlanError(f"dims.{k} must be at least 1 (the largest {k} it serves), got {v}")
    annotations = {}
    for k, v in expect(d["annotations"], dict, "annotations").items():
        if not k.lstrip("-").isdigit():
            raise PlanError(f"annotations: key {k!r:.40} is not a node id")
        annotations[int(k)] = schedule_from_json(v, f"annotations.{k}")
    return Graph(
        [node_from_json(n) for n in expect(d["nodes"], list, "nodes")],
        {k: expect(v, int, f"output {k!r}") for k, v in outputs.items()},
        dict(dims),
        expect(d["name"], str, "name"),
        annotations,
        expect(d["meta"], dict, "meta"),
        list(expect_ids(d.get("effects", []), "effects")),
    )


def check_lowering(g: Graph) -> None:
    """Every einsum of a compiled entry carries the recipe its spec lowers to (the recipe
    depends only on the spec, and on a dequantized operand: compiler/passes/contract.py); the
    runtime follows the recipe, so any other one would multiply the wrong axes."""
    from einplan.compiler.passes.contract import lower_dequantized, lower_einsum

    nodes, lowered = None, {}
    for n in g.nodes:
        if n.op is not Op.EINSUM:
            continue
        where = f"node %{n.id} ({n.name or n.op.value})"
        if "recipe" not in n.attrs:
            raise PlanError(f"{where}: einsum has no lowering recipe")
        if nodes is None:
            nodes = g.by_id()
        deq = [nodes[i] for i in n.inputs if nodes[i].op is Op.DEQUANTIZE]
        spec = n.attrs["spec"]
        if deq:
            want = repr(lower_dequantized(n, deq[0]))
        elif spec in lowered:
            want = lowered[spec]
        else:
            want = lowered[spec] = repr(lower_einsum(spec))
        if repr(n.attrs["recipe"]) != want:  # repr: 1 is not True, 8.0 is not 8
            raise PlanError(
                f"{where}: recipe {n.attrs['recipe']} is not the lowering of einsum "
                f"{spec!r} ({want})"
            )


def slot_sizes(g: Graph) -> list[str]:
    """The size (a polynomial, as a comparable string) of each arena slot of ``meta.memory``."""
    memory = expect(g.meta.get("memory"), dict, "meta.memory")
    sizes = []
    for k, raw in enumerate(expect(memory.get("slots"), list, "meta.memory.slots")):
        what = f"meta.memory.slots.{k}"
        poly = {}
        for term in expect(raw, list, what):
            coef, names = expect(term, list, what)
            if expect(coef, int, what) < 1:
                raise PlanError(f"{what}: coefficient {coef} must be positive")
            for name in expect(names, list, what):
                if name not in g.dims:
                    raise PlanError(f"{what}: dim {name!r:.40} is not declared")
            poly[tuple(names)] = coef
        sizes.append(repr(sorted(poly.items())))
    schedule = expect(g.meta.get("schedule", {}), dict, "meta.schedule")
    if schedule.get("blas_threads") is not None:
        expect(schedule["blas_threads"], int, "meta.schedule.blas_threads")
    if expect(schedule.get("workers", 0), int, "meta.schedule.workers") < 0:
        raise PlanError("meta.schedule.workers must be 0 (one step at a time) or more")
    return sizes


def check_schedule(g: Graph) -> None:
    """Check the schedule and memory annotations of a compiled entry against its graph, so
    that the runtime can trust them: every step has one; levels rise along every edge and
    in step order, threads of a level differ; a buffer (``slot``) of the right size for each
    step that needs one (none for views and outputs), never taken while its value is live
    (but by an in-place step over the input dying there) nor within the level that freed it;
    each value of ``free_after`` computed, freed once, at or after its last use (its views'
    too), and never an output."""
    steps = [n for n in g.nodes if n.op not in LEAVES]
    ann = g.annotations
    step_ids = {n.id for n in steps}
    if set(ann) != step_ids:
        odd = sorted(set(ann) ^ step_ids)[:5]
        raise PlanError(f"annotations must be those of the computed nodes (not so for {odd})")
    sizes = slot_sizes(g)
    order = {n.id: k for k, n in enumerate(g.nodes)}
    root: dict[int, int] = {}
    last_use: dict[int, int] = {}  # root value -> the last step reading it or a view of it
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(g.nodes):
        root[n.id] = root[n.inputs[0]] if OPS[n.op].alias else n.id
        for i in n.inputs:
            last_use[root[i]] = k
            readers.setdefault(root[i], []).append(n.id)
    outputs = set(g.outputs.values())
    output_roots = {root[v] for v in outputs}
    holder: dict[int, int] = {}  # slot -> the live value in it
    freed_level: dict[int, int] = {}  # slot -> level of the step that freed its last value
    slot_of: dict[int, int] = {}
    freed: dict[int, int] = {}  # value -> step that freed it
    threads: dict[int, int] = {}  # level -> the next thread number
    prev_level = 0
    for n in steps:
        k, a = order[n.id], ann[n.id]
        where = f"node %{n.id} ({n.name or n.op.value}) annotation"
        if a.level < 0 or a.thread < 0 or a.level < prev_level:
            raise PlanError(
                f"{where}: level {a.level}, thread {a.thread} (must be >= 0, levels in step order)"
            )
        prev_level = a.level
        for i in n.inputs:
            if i in ann and ann[i].level >= a.level:
                raise PlanError(f"{where}: level {a.level} is not above its input %{i}'s")
        if a.thread != threads.get(a.level, 0):  # the schedule pass numbers them in step order
            raise PlanError(
                f"{where}: thread {a.thread} of level {a.level} (the level's threads are "
                f"numbered 0, 1, ... in step order: expected {threads.get(a.level, 0)})"
            )
        threads[a.level] = a.thread + 1
        if a.free_after is None:
            raise PlanError(f"{where}: no free_after (memory pass annotations missing)")
        frees = set(a.free_after)
        if OPS[n.op].alias or n.id in output_roots:
            if a.slot is not None:
                raise PlanError(f"{where}: slot {a.slot} for a view or output (must be null)")
        else:
            s = a.slot
            if s is None or not 0 <= s < len(sizes):
                raise PlanError(f"{where}: slot {s!r} is not one of the {len(sizes)} buffers")
            size = repr(sorted(scale_poly(numel(n.shape), ITEMSIZE[n.dtype]).items()))
            if sizes[s] != size:
                raise PlanError(f"{where}: slot {s} is not the size of its value")
            if s in holder:
                first = root[n.inputs[0]] if n.inputs else None
                donated = (
                    OPS[n.op].inplace
                    and holder[s] == first
                    and first in frees
                    and all(ann[r].level < a.level for r in readers[first] if r != n.id)
                )
                if not donated:
                    raise PlanError(f"{where}: slot {s} still holds live value %{holder[s]}")
            elif freed_level.get(s, -1) >= a.level:
                raise PlanError(f"{where}: slot {s} reused in the level that frees it")
            holder[s] = n.id
            slot_of[n.id] = s
        for v in a.free_after:
            if v not in step_ids or order[v] > k:
                raise PlanError(f"{where}: free_after %{v} is not a value computed by then")
            if v in freed:
                raise PlanError(f"{where}: free_after %{v}, already freed after %{freed[v]}")
            if v in outputs or last_use.get(root[v], -1) > k:
                raise PlanError(f"{where}: free_after %{v}, which is read later")
            freed[v] = n.id
            s = slot_of.get(v)
            if s is not None and holder.get(s) == v:
                del holder[s]
                freed_level[s] = a.level
