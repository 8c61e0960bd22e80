"""Post-training full-integer quantisation (TFLite style) of a pruned U-Net.

Steps: fold batch-norm into the preceding conv; run the folded float graph on
calibration (training) images and record every node output's min/max; derive
asymmetric int8 activation quantisation (range nudged to contain 0); quantise weights
per output channel, symmetric, to [-127, 127]; biases to int32 at scale
s_in * s_w[o]; requantisation multipliers as TFLite's QuantizeMultiplier (Q31
mantissa + power-of-two shift).  ReLU is fused as the clamp (act_min = zp_out);
Sigmoid and Hard Sigmoid become 256-entry LUT nodes with output scale 1/256 and
zero point -128.  Concat rescales each input to the output quantisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

import int8_ref
from unet import NUM_CLASSES, act_fn, input_sources, level_names

LUT_SCALE = 1.0 / 256.0
LUT_ZP = -128


def quantize_multiplier(m: float):
    """TFLite QuantizeMultiplier: m ~= q * 2^(shift - 31), q in [2^30, 2^31)."""
    if m == 0.0 or not math.isfinite(m):
        return 0, 0
    frac, shift = math.frexp(m)
    q = int(int8_ref.round_half_away(np.float64(frac * (1 << 31))))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        return 2**31 - 1, 30
    return q, shift


def act_quant(lo: float, hi: float):
    """Asymmetric int8 (scale, zero_point) covering [lo, hi] nudged to include 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(int8_ref.round_half_away(np.float64(-128 - lo / scale)), -128, 127))
    return scale, zp


def folded_graph(model):
    """The int8 graph's structure with folded float parameters.

    Returns nodes (manifest-like dicts, op in conv2d/convtranspose2/lut/maxpool2/concat,
    conv nodes carry 'relu': bool) and a dict of float arrays {tensor name: array}."""
    depth, act = model.depth, model.act
    enc, mid, dec = level_names(depth)
    H, W = {"tiny": (32, 64), "small": (96, 192)}[model.size]
    nodes, fl = [], {}
    relu = act == "relu"

    def block(name, src, h, w):
        lvl, c = name.split(".")
        wt, b = (t.detach().double() for t in model.layer_params(name))
        bn = model.bn_of(name)
        g = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        fw = wt * g[:, None, None, None]
        fb = (b - bn.running_mean.detach().double()) * g + bn.bias.detach().double()
        fl[f"{name}.weight"], fl[f"{name}.bias"] = fw.numpy(), fb.numpy()
        cout = wt.shape[0]
        nodes.append(dict(name=name, op="conv2d", inputs=[src], out_shape=[cout, h, w],
                          attrs=dict(kernel=3, padding=1), relu=relu,
                          params=dict(weight=f"{name}.weight", bias=f"{name}.bias")))
        if relu:
            return name
        aname = f"{lvl}.act{c[-1]}"
        nodes.append(dict(name=aname, op="lut", inputs=[name], out_shape=[cout, h, w], attrs={},
                          params=dict(table=f"{aname}.table"), fn=act))
        return aname

    src, h, w = "input", H, W
    skips = []
    for e in enc:
        src = block(f"{e}.conv1", block(f"{e}.conv0", src, h, w), h, w)
        skips.append(src)
        h, w = h // 2, w // 2
        nodes.append(dict(name=f"{e}.pool", op="maxpool2", inputs=[src],
                          out_shape=[model.widths[f"{e}.conv1"], h, w], attrs={}, params={}))
        src = f"{e}.pool"
    src = block(f"{mid}.conv1", block(f"{mid}.conv0", src, h, w), h, w)
    for d in dec:
        l = int(d[3:])
        h, w = h * 2, w * 2
        wt, b = model.layer_params(f"{d}.up")
        fl[f"{d}.up.weight"], fl[f"{d}.up.bias"] = wt.detach().double().numpy(), b.detach().double().numpy()
        nodes.append(dict(name=f"{d}.up", op="convtranspose2", inputs=[src], out_shape=[wt.shape[1], h, w],
                          attrs={}, relu=False,
                          params=dict(weight=f"{d}.up.weight", bias=f"{d}.up.bias")))
        cs = model.widths[f"enc{l}.conv1"]
        nodes.append(dict(name=f"{d}.cat", op="concat", inputs=[skips[l], f"{d}.up"],
                          out_shape=[cs + wt.shape[1], h, w], attrs={}, params={}))
        src = block(f"{d}.conv1", block(f"{d}.conv0", f"{d}.cat", h, w), h, w)
    wt, b = model.layer_params("head")
    fl["head.weight"], fl["head.bias"] = wt.detach().double().numpy(), b.detach().double().numpy()
    nodes.append(dict(name="head", op="conv2d", inputs=[src], out_shape=[NUM_CLASSES, H, W],
                      attrs=dict(kernel=1, padding=0), relu=False,
                      params=dict(weight="head.weight", bias="head.bias")))
    return nodes, fl


def run_folded(nodes, fl, x):
    """Float run of the folded graph (float64) -> {node: output}; for calibration."""
    vals = {"input": x}
    for n in nodes:
        a = [vals[i] for i in n["inputs"]]
        op = n["op"]
        if op == "conv2d":
            y = F.conv2d(a[0], torch.from_numpy(fl[n["params"]["weight"]]), torch.from_numpy(fl[n["params"]["bias"]]),
                         padding=n["attrs"]["padding"])
            y = F.relu(y) if n["relu"] else y
        elif op == "convtranspose2":
            y = F.conv_transpose2d(a[0], torch.from_numpy(fl[n["params"]["weight"]]),
                                   torch.from_numpy(fl[n["params"]["bias"]]), stride=2)
        elif op == "lut":
            y = act_fn(n["fn"])(a[0])
        elif op == "maxpool2":
            y = F.max_pool2d(a[0], 2)
        else:
            y = torch.cat(a, 1)
        vals[n["name"]] = y
    return vals


def quantize(model, calib_x, batch=16):
    """Full-integer quantisation.  Returns (manifest fields: input quant, output quant,
    nodes with out_quant/act_min/act_max/attrs), {tensor: (layer, kind, int array)}."""
    model.eval()
    nodes, fl = folded_graph(model)
    lo = {"input": math.inf}
    hi = {"input": -math.inf}
    with torch.no_grad():
        for i in range(0, len(calib_x), batch):
            xb = torch.as_tensor(calib_x[i : i + batch], dtype=torch.float64)
            vals = run_folded(nodes, fl, xb)
            for k, v in vals.items():
                lo[k] = min(lo.get(k, math.inf), float(v.min()))
                hi[k] = max(hi.get(k, -math.inf), float(v.max()))

    q = {"input": act_quant(lo["input"], hi["input"])}
    out_nodes, tensors = [], {}
    for n in nodes:
        name, op = n["name"], n["op"]
        sin, zin = q[n["inputs"][0]]
        node = dict(name=name, op=op, inputs=n["inputs"], out_shape=n["out_shape"], attrs=dict(n["attrs"]),
                    params=dict(n["params"]))
        if op in ("conv2d", "convtranspose2"):
            so, zo = act_quant(0.0 if n["relu"] else lo[name], hi[name])
            if n["relu"]:
                zo = -128  # [0, hi] maps exactly onto [-128, 127]
            w = fl[n["params"]["weight"]]
            axis = 1 if op == "convtranspose2" else 0
            red = tuple(i for i in range(w.ndim) if i != axis)
            wmax = np.abs(w).max(axis=red)
            sw = np.where(wmax > 0, wmax / 127.0, 1.0)
            shape = [1] * w.ndim
            shape[axis] = -1
            wq = np.clip(int8_ref.round_half_away(w / sw.reshape(shape)), -127, 127).astype(np.int8)
            bq = np.clip(int8_ref.round_half_away(fl[n["params"]["bias"]] / (sin * sw)), -(2**31), 2**31 - 1)
            mult, shift = zip(*(quantize_multiplier(sin * s / so) for s in sw))
            tensors[n["params"]["weight"]] = (name, "weight", wq)
            tensors[n["params"]["bias"]] = (name, "bias", bq.astype(np.int32))
            tensors[f"{name}.multiplier"] = (name, "multiplier", np.array(mult, np.int32))
            tensors[f"{name}.shift"] = (name, "shift", np.array(shift, np.int32))
            node["params"].update(multiplier=f"{name}.multiplier", shift=f"{name}.shift")
            node["act_min"], node["act_max"] = (zo if n["relu"] else -128), 127
            q[name] = (so, zo)
        elif op == "lut":
            qs = np.arange(-128, 128)
            real = torch.from_numpy((qs - zin) * np.float64(sin))
            f = act_fn(n["fn"])(real).numpy()
            table = np.clip(int8_ref.round_half_away(f / LUT_SCALE) + LUT_ZP, -128, 127).astype(np.int8)
            tensors[n["params"]["table"]] = (name, "lut", table)
            q[name] = (LUT_SCALE, LUT_ZP)
            node["act_min"], node["act_max"] = -128, 127
        elif op == "maxpool2":
            q[name] = (sin, zin)
            node["act_min"], node["act_max"] = -128, 127
        elif op == "concat":
            ins = [q[i] for i in n["inputs"]]
            # Output range: the union of the inputs' representable ranges.
            rlo = min(s * (-128 - z) for s, z in ins)
            rhi = max(s * (127 - z) for s, z in ins)
            so, zo = act_quant(rlo, rhi)
            node["attrs"]["rescale"] = []
            for s, z in ins:
                m, sh = quantize_multiplier(s / so)
                node["attrs"]["rescale"].append(dict(multiplier=int(m), shift=int(sh)))
            q[name] = (so, zo)
            node["act_min"], node["act_max"] = -128, 127
        node["out_quant"] = dict(scale=q[name][0], zero_point=q[name][1])
        out_nodes.append(node)
    inq = dict(scale=q["input"][0], zero_point=q["input"][1])
    outq = dict(scale=q["head"][0], zero_point=q["head"][1])
    return inq, outq, out_nodes, tensors
