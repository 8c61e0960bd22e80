"""Independent NumPy integer reference for the int8 models (docs/models.md).

Written from TFLite's integer quantisation spec and the contract in docs/models.md,
without PyTorch: every value is an integer held in int64 and wrapped to int32 where
the spec says i32.  Convolutions sum int8 x (int8 - zp) products; those products are
bounded by 127*255, so the sums are exact even when evaluated with a float64 matrix
product (|sum| < 2^53 for any layer here, asserted below); the bias, multiplier and
shift (which faults can make arbitrary) are applied in exact integer arithmetic.
"""

from __future__ import annotations

import numpy as np

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def wrap32(v):
    """Two's-complement wrap of int64 values to the int32 range."""
    v = np.asarray(v, dtype=np.int64)
    return ((v + 2**31) & 0xFFFFFFFF) - 2**31


def srdhm(a, b):
    """SaturatingRoundingDoublingHighMul of int32 values (as int64 arrays)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b  # |ab| <= 2^62: fits int64
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    q = np.where(s >= 0, s >> 31, -((-s) >> 31))  # division by 2^31 truncating toward zero
    return np.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, q)


def rdbpot(x, e):
    """RoundingDivideByPOT, e in [0, 31]."""
    x = np.asarray(x, np.int64)
    e = np.asarray(e, np.int64)
    mask = (np.int64(1) << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > thr)


def mbqm(x, m, shift):
    """MultiplyByQuantizedMultiplier; x, m int32 values, shift clamped to [-31, 30]."""
    shift = np.clip(np.asarray(shift, np.int64), -31, 30)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rdbpot(srdhm(wrap32(np.asarray(x, np.int64) << left), m), right)


def round_half_away(v):
    """Exact round-half-away-from-zero of float values (no x+0.5 double rounding)."""
    t = np.trunc(v)
    frac = v - t  # exact
    return t + np.where(np.abs(frac) >= 0.5, np.sign(v), 0)


def quantize_input(x, scale, zp):
    """q = clamp(round(x / scale) + zp, -128, 127), the division in float32."""
    v = np.asarray(x, np.float32) / np.float32(scale)
    q = round_half_away(v).astype(np.int64) + zp
    return np.clip(q, -128, 127).astype(np.int8)


def _im2col(x, k, pad):
    """x int64 [C,H,W] (already zero-point-subtracted) -> [C*k*k, H*W], padding 0."""
    c, h, w = x.shape
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((c, k, k, h, w), np.int64)
    for i in range(k):
        for j in range(k):
            cols[:, i, j] = x[:, i : i + h, j : j + w]
    return cols.reshape(c * k * k, h * w)


def _exact_matmul(w, cols):
    """Exact integer w @ cols for int8-range operands (float64 BLAS, bound-checked)."""
    bound = np.abs(w).sum(axis=1).max(initial=0) * np.abs(cols).max(initial=0)
    assert bound < 2**53, "accumulator bound exceeds exact float64 range"
    return np.rint(w.astype(np.float64) @ cols.astype(np.float64)).astype(np.int64)


def requant(acc, node, p):
    """clamp(zp_out + MBQM(acc, multiplier[o], shift[o]), act_min, act_max); acc [C, ...]."""
    c = acc.shape[0]
    m = p["multiplier"].astype(np.int64).reshape(c, *([1] * (acc.ndim - 1)))
    s = p["shift"].astype(np.int64).reshape(c, *([1] * (acc.ndim - 1)))
    y = mbqm(acc, m, s) + node["out_quant"]["zero_point"]  # exact int64 add, then clamp
    return np.clip(y, node["act_min"], node["act_max"]).astype(np.int8)


def run_node(node, args, p, zps):
    op = node["op"]
    if op == "conv2d":
        x = args[0].astype(np.int64) - zps[0]
        k, pad = node["attrs"]["kernel"], node["attrs"]["padding"]
        c, h, w = x.shape
        wt = p["weight"].astype(np.int64).reshape(p["weight"].shape[0], -1)
        acc = _exact_matmul(wt, _im2col(x, k, pad)) + p["bias"].astype(np.int64)[:, None]
        acc = wrap32(acc).reshape(-1, h, w)
        return requant(acc, node, p)
    if op == "convtranspose2":
        x = args[0].astype(np.int64) - zps[0]
        cin, h, w = x.shape
        wt = p["weight"].astype(np.int64)  # [Cin, Cout, 2, 2]
        cout = wt.shape[1]
        # out[o, 2i+di, 2j+dj] = b[o] + sum_c x[c,i,j] * w[c,o,di,dj]
        prod = _exact_matmul(wt.transpose(1, 2, 3, 0).reshape(cout * 4, cin), x.reshape(cin, h * w))
        acc = prod.reshape(cout, 2, 2, h, w).transpose(0, 3, 1, 4, 2).reshape(cout, 2 * h, 2 * w)
        acc = wrap32(acc + p["bias"].astype(np.int64)[:, None, None])
        return requant(acc, node, p)
    if op == "lut":
        return p["table"][args[0].astype(np.int64) + 128]
    if op == "maxpool2":
        x = args[0]
        c, h, w = x.shape
        return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))
    if op == "concat":
        zo = node["out_quant"]["zero_point"]
        parts = []
        for a, zi, r in zip(args, zps, node["attrs"]["rescale"]):
            y = zo + mbqm(a.astype(np.int64) - zi, r["multiplier"], r["shift"])
            parts.append(np.clip(y, -128, 127).astype(np.int8))
        return np.concatenate(parts, 0)
    raise ValueError(f"node {node['name']}: op {op} is not an int8 op")


def run(manifest, params, x_q, keep_all=False):
    """Run an int8 manifest on one quantised input [25,H,W] i8; returns the output node's
    i8 tensor (or every node's output when keep_all)."""
    zp = {"input": manifest["input"]["quant"]["zero_point"]}
    vals = {"input": np.asarray(x_q, np.int8)}
    for n in manifest["nodes"]:
        args = [vals[i] for i in n["inputs"]]
        p = {r: params[t] for r, t in n["params"].items()}
        vals[n["name"]] = run_node(n, args, p, [zp[i] for i in n["inputs"]])
        zp[n["name"]] = n["out_quant"]["zero_point"]
    return vals if keep_all else vals[manifest["output"]["node"]]


def argmax_classes(logits):
    """Class map [.., H, W] from logits [.., C, H, W]: first max wins, NaN counts as max."""
    return np.argmax(logits, axis=-3).astype(np.uint8)
