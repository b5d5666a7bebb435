"""Kernels of the mixture-of-experts ops: top-k routing, one routed expert, the load-balancing
loss, and their reverse ops.

The plan is static and the work sparse: a ``moe_expert`` step's buffers have room for every
token, but its kernel finds the tokens routed to its expert (their gate is non-zero) when it
runs and multiplies only those rows, so an expert's FLOPs follow the tokens it got. The counts
of the last run stay readable per step (:data:`LOAD`, for ``--profile`` and reports).
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op

# node name -> tokens routed to that expert in the step's last run
LOAD: dict[str, int] = {}
# moe_topk node name -> mean entropy (nats) of the router's distribution over its tokens
ROUTER_ENTROPY: dict[str, float] = {}


def router_entropy() -> float | None:
    """The mean router entropy over the MoE layers of the last run (None: no MoE run yet);
    log E when routing is uniform, 0 when each token is sure of one expert."""
    return sum(ROUTER_ENTROPY.values()) / len(ROUTER_ENTROPY) if ROUTER_ENTROPY else None


def topk_indices(p2: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``p2`` (rows, E), the columns of its ``k`` largest values, largest first;
    equal values: the lower column first."""
    return np.argsort(-p2, axis=-1, kind="stable")[:, :k]


def make_moe_topk(node: Node, shapes, out_shape, scratch):
    k, norm, e = node.attrs["k"], node.attrs["norm"], out_shape[-1]
    name = node.name

    def moe_topk(ins, out):
        p2, o2 = ins[0].reshape(-1, e), out.reshape(-1, e)
        ROUTER_ENTROPY[name] = float(-np.vecdot(p2, np.log(np.maximum(p2, 1e-30))).mean())
        idx = topk_indices(p2, k)
        vals = np.take_along_axis(p2, idx, axis=-1)
        if norm:
            vals = vals / vals.sum(axis=-1, keepdims=True)
        o2.fill(0)
        np.put_along_axis(o2, idx, vals, axis=-1)
        return out

    return moe_topk


def make_moe_topk_grad(node: Node, shapes, out_shape, scratch):
    """d p: the cotangent of the picked entries, through w = p / sum(picked p) when ``norm``:
    d p_i = (ct_i - sum_j ct_j w_j) / sum(picked p)."""
    k, norm, e = node.attrs["k"], node.attrs["norm"], out_shape[-1]

    def moe_topk_grad(ins, out):
        p2, ct2, o2 = ins[0].reshape(-1, e), ins[1].reshape(-1, e), out.reshape(-1, e)
        idx = topk_indices(p2, k)
        g = np.take_along_axis(ct2, idx, axis=-1)
        if norm:
            vals = np.take_along_axis(p2, idx, axis=-1)
            total = vals.sum(axis=-1, keepdims=True)
            g = (g - (g * (vals / total)).sum(axis=-1, keepdims=True)) / total
        o2.fill(0)
        np.put_along_axis(o2, idx, g, axis=-1)
        return out

    return moe_topk_grad


def _routed(x, gates, d, e, col):
    """Rows routed to expert ``col``, their gate values and hidden states."""
    g = gates.reshape(-1, e)[:, col]
    rows = np.flatnonzero(g)
    return rows, g[rows], x.reshape(-1, d)[rows]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    s = np.negative(a)
    np.exp(s, out=s)
    s += 1
    return np.divide(1, s, out=s)


# A training graph's forward expert step (attr ``keep``) leaves its activations here for its
# reverse steps, keyed by node name and checked against the buffers it read: they reuse them
# instead of multiplying again. Each forward run replaces the entry.
STASH: dict[str, dict] = {}


def buffer_key(*arrays: np.ndarray) -> tuple:
    """Where and how large each array is: a reverse step checks by it that what a forward step
    left behind was made from the very buffers it reads."""
    return tuple((a.__array_interface__["data"][0], a.shape) for a in arrays)


def _activations(x, gates, wg, wu, d, e, col):
    """The routed rows and their activations a = x Wg^T, u = x Wu^T, s = sigmoid(a)."""
    rows, g, xs = _routed(x, gates, d, e, col)
    a, u = xs @ wg.T, xs @ wu.T
    return {"rows": rows, "g": g, "xs": xs, "a": a, "u": u, "s": _sigmoid(a)}


def make_moe_expert(node: Node, shapes, out_shape, scratch):
    col, d, e = node.attrs["expert"], out_shape[-1], shapes[1][-1]
    name, keep = node.name, bool(node.attrs.get("keep"))

    def moe_expert(ins, out):
        x, gates, wg, wu, wd = ins
        o2 = out.reshape(-1, d)
        o2.fill(0)
        if keep:
            act = _activations(x, gates, wg, wu, d, e, col)
            act["key"] = buffer_key(x, gates, wg, wu, wd)
            STASH[name] = act
            rows, g = act["rows"], act["g"]
            LOAD[name] = len(rows)
            if len(rows):
                h = act["h"] = act["a"] * act["s"]
                h *= act["u"]
                y = h @ wd.T
                y *= g[:, None]
                o2[rows] = y
            return out
        rows, g, xs = _routed(x, gates, d, e, col)
        LOAD[name] = len(rows)
        if len(rows):
            a = xs @ wg.T
            h = _sigmoid(a)
            h *= a
            h *= xs @ wu.T
            y = h @ wd.T
            y *= g[:, None]
            o2[rows] = y
        return out

    return moe_expert


def _reverse_parts(act: dict, cts: np.ndarray, wd: np.ndarray) -> dict:
    """What every reverse step of one expert needs, from the routed rows' cotangent: c = ct Wd,
    dy = g ct, d a and d u (and h when the forward step did not keep it)."""
    a, u, s, g = act["a"], act["u"], act["s"], act["g"][:, None]
    h = act.get("h")
    if h is None:
        h = a * s
        h *= u
    c = cts @ wd
    dh = c * g
    du = dh * a
    du *= s
    da = dh * u
    da *= s
    dsilu = np.subtract(1, s, out=dh)  # dh is spent: its buffer holds 1 + a (1 - s)
    dsilu *= a
    dsilu += 1
    da *= dsilu
    return {"h": h, "c": c, "dy": cts * g, "da": da, "du": du}


def make_moe_expert_grad(node: Node, shapes, out_shape, scratch):
    """The gradient of one input, from the activations on the expert's routed rows (those its
    forward step kept, else computed again): with a = x Wg^T, u = x Wu^T, s = sigmoid(a),
    h = a s u, y = g (h Wd^T) and c = ct Wd: d g = <c, h>; d Wd = (g ct)^T h; d h = g c;
    d a = d h u s (1 + a (1 - s)); d u = d h a s; d Wg = d a^T x; d Wu = d u^T x;
    d x = d a Wg + d u Wu. c is computed once per run and shared by the sibling steps."""
    col, wrt = node.attrs["expert"], node.attrs["wrt"]
    d, e = shapes[0][-1], shapes[1][-1]
    forward = node.name.rsplit(".grad", 1)[0]

    def moe_expert_grad(ins, out):
        x, gates, wg, wu, wd, ct = ins
        act = STASH.get(forward)
        if act is None or act["key"] != buffer_key(x, gates, wg, wu, wd):
            act = _activations(x, gates, wg, wu, d, e, col)
        rows = act["rows"]
        if wrt in ("x", "gates") or not len(rows):
            out.fill(0)
        if not len(rows):
            return out
        ct_key = buffer_key(ct)
        if act.get("ct_key") != ct_key:  # the first sibling of this run: the shared parts
            back = _reverse_parts(act, ct.reshape(-1, d)[rows], wd)
            act.update(back, ct_key=ct_key)
        if wrt == "gates":
            out.reshape(-1, e)[rows, col] = np.vecdot(act["c"], act["h"])
        elif wrt == "down":
            np.matmul(act["dy"].T, act["h"], out=out)
        elif wrt == "gate":
            np.matmul(act["da"].T, act["xs"], out=out)
        elif wrt == "up":
            np.matmul(act["du"].T, act["xs"], out=out)
        else:
            dx = act["da"] @ wg
            dx += act["du"] @ wu
            out.reshape(-1, d)[rows] = dx
        return out

    return moe_expert_grad


def _aux_weights(probs: list[np.ndarray], k: int) -> tuple[np.ndarray, int]:
    """Per expert, the share of all top-k picks over every layer's rows, and the row count."""
    e = probs[0].shape[-1]
    counts = np.zeros(e, np.int64)
    rows = 0
    for p in probs:
        p2 = p.reshape(-1, e)
        counts += np.bincount(topk_indices(p2, k).reshape(-1), minlength=e)
        rows += len(p2)
    return counts / rows, rows


def make_moe_aux_loss(node: Node, shapes, out_shape, scratch):
    """coef * E * sum_e f_e P_e: f_e the share of rows (over every MoE layer) whose top-k picks
    e, P_e the mean router probability of e (transformers' load_balancing_loss_func)."""
    k, coef = node.attrs["k"], node.attrs["coef"]
    dtype = to_numpy_dtype(node.dtype)

    def moe_aux_loss(ins, out):
        e = ins[0].shape[-1]
        share, rows = _aux_weights(ins, k)
        total = sum(p.reshape(-1, e).sum(axis=0) for p in ins) / rows
        out[...] = dtype.type(coef * e) * np.dot(share.astype(dtype), total)
        return out

    return moe_aux_loss


def make_moe_aux_loss_grad(node: Node, shapes, out_shape, scratch):
    """d probs of any layer = ct * coef * E * f_e / rows, the same for every row and layer."""
    k, coef = node.attrs["k"], node.attrs["coef"]
    dtype = to_numpy_dtype(node.dtype)

    def moe_aux_loss_grad(ins, out):
        *probs, ct = ins
        e = probs[0].shape[-1]
        share, rows = _aux_weights(probs, k)
        out[...] = (share * (float(ct) * coef * e / rows)).astype(dtype)
        return out

    return moe_aux_loss_grad


def make_sigmoid(node: Node, shapes, out_shape, scratch):
    def sigmoid(ins, out):
        np.negative(ins[0], out=out)
        np.exp(out, out=out)
        out += 1
        np.divide(1, out, out=out)
        return out

    return sigmoid


def make_sigmoid_grad(node: Node, shapes, out_shape, scratch):
    """d x = ct * y * (1 - y) with y the sigmoid's output."""

    def sigmoid_grad(ins, out):
        y, ct = ins
        np.subtract(1, y, out=out)
        out *= y
        out *= ct
        return out

    return sigmoid_grad


MOE_KERNELS = {
    Op.SIGMOID: make_sigmoid,
    Op.SIGMOID_GRAD: make_sigmoid_grad,
    Op.MOE_TOPK: make_moe_topk,
    Op.MOE_TOPK_GRAD: make_moe_topk_grad,
    Op.MOE_EXPERT: make_moe_expert,
    Op.MOE_EXPERT_GRAD: make_moe_expert_grad,
    Op.MOE_AUX_LOSS: make_moe_aux_loss,
    Op.MOE_AUX_LOSS_GRAD: make_moe_aux_loss_grad,
}
