"""Re-read every exported model file and check it against the contract and the refs.

    /work/pyenv/bin/python tools/models/selfcheck.py [--fast]

Checks per model: manifest structure (format, topological order, tensor ownership,
64-byte aligned offsets in manifest order, nbytes = shape x dtype, no overlap,
params_bytes), safetensors dtypes/shapes equal to the manifest, then recomputes the
references: int8 with the NumPy integer reference (inputs_q, logits, classes and every
fault, bit-identical), fp32 with PyTorch (bit-identical to the refs) and with the
independent NumPy fp32 implementation (within the contract tolerance, classes equal
except near-ties).  Also the total size of board-images/models.  Exit status 1 on any
failure.  --fast skips the NumPy fp32 cross-check for small models.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

import export
import int8_ref

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "board-images", "models")
NP = {"f32": np.float32, "i8": np.int8, "i32": np.int32, "u8": np.uint8}
KINDS = {"weight", "bias", "bn_gamma", "bn_beta", "bn_mean", "bn_var", "multiplier", "shift", "lut"}
OPS = {"conv2d", "batchnorm", "relu", "sigmoid", "hardsigmoid", "lut", "maxpool2", "convtranspose2", "concat"}
MAX_BYTES = 40 * 1024 * 1024

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("  FAIL", msg, flush=True)
    return cond


def check_manifest(man, params, name):
    check(man["format"] == export.FORMAT, f"{name}: format")
    check(man["name"] == name, f"{name}: name field")
    size, act, stage = name.split("-")
    check((man["size"], man["activation"], man["stage"]) == (size, act, stage), f"{name}: size/act/stage")
    seen = {"input"}
    owner = {}
    for n in man["nodes"]:
        check(n["op"] in OPS, f"{name}: node {n['name']} op {n['op']}")
        check(all(i in seen for i in n["inputs"]), f"{name}: node {n['name']} inputs not earlier")
        for role, t in n["params"].items():
            check(t not in owner, f"{name}: tensor {t} used twice")
            owner[t] = n["name"]
        if stage == "int8":
            check(n.get("out_quant") is not None, f"{name}: node {n['name']} lacks out_quant")
            check(n["op"] not in ("batchnorm", "relu", "sigmoid", "hardsigmoid"), f"{name}: fp32 op in int8")
        else:
            check(n.get("out_quant") is None, f"{name}: fp32 node with out_quant")
            check(n["op"] != "lut", f"{name}: lut in fp32 model")
        seen.add(n["name"])
    check(man["output"]["node"] == man["nodes"][-1]["name"], f"{name}: output node")
    order = export.ordered_tensors(man["nodes"], {t["name"]: None for t in man["tensors"]})
    check(order == [t["name"] for t in man["tensors"]], f"{name}: tensors not in manifest order")
    end = 0
    blob = bytearray(man["params_bytes"])
    for t in man["tensors"]:
        check(t["kind"] in KINDS, f"{name}: {t['name']} kind")
        check(owner.get(t["name"]) == t["layer"], f"{name}: {t['name']} layer {t['layer']} != owner")
        check(t["offset"] % 64 == 0, f"{name}: {t['name']} offset not 64-aligned")
        check(t["offset"] >= end, f"{name}: {t['name']} overlaps or out of order")
        want = int(np.prod(t["shape"])) * np.dtype(NP[t["dtype"]]).itemsize
        check(t["nbytes"] == want, f"{name}: {t['name']} nbytes")
        arr = params.get(t["name"])
        if check(arr is not None, f"{name}: {t['name']} missing in safetensors"):
            check(arr.dtype == NP[t["dtype"]] and list(arr.shape) == t["shape"], f"{name}: {t['name']} dtype/shape")
            blob[t["offset"] : t["offset"] + t["nbytes"]] = arr.tobytes()
        end = t["offset"] + t["nbytes"]
    check(end <= man["params_bytes"] and man["params_bytes"] % 64 == 0, f"{name}: params_bytes")
    check(set(params) == {t["name"] for t in man["tensors"]}, f"{name}: safetensors has extra tensors")
    # The blob view round-trips (what the agent writes into accelerator memory).
    for t in man["tensors"]:
        v = np.frombuffer(bytes(blob[t["offset"] : t["offset"] + t["nbytes"]]), NP[t["dtype"]]).reshape(t["shape"])
        check(np.array_equal(v.view(np.uint8), params[t["name"]].view(np.uint8)), f"{name}: blob {t['name']}")


def near_tie_ok(cls, ref_cls, logits):
    """Classes equal except pixels whose top-two reference logits are within 1e-4."""
    diff = cls != ref_cls
    if not diff.any():
        return True
    s = np.sort(np.nan_to_num(logits.astype(np.float64), nan=np.inf), axis=-3)
    gap = s[..., -1, :, :] - s[..., -2, :, :]
    return bool((gap[diff] <= 1e-4 * np.maximum(1, np.abs(s[..., -1, :, :][diff]))).all())


def check_refs(man, params, x, name, fast):
    refs = load_file(os.path.join(OUT, "refs", f"{name}.safetensors"))
    faults = json.load(open(os.path.join(OUT, "refs", f"{name}.json")))
    n = len(x)
    nlog = refs["logits"].shape[0]
    check(refs["classes"].shape == (n,) + x.shape[2:] and refs["classes"].dtype == np.uint8, f"{name}: classes shape")
    check(refs["logits"].shape == (nlog, 6) + x.shape[2:], f"{name}: logits shape")
    int8 = man["stage"] == "int8"
    if int8:
        q = man["input"]["quant"]
        xq = int8_ref.quantize_input(x, q["scale"], q["zero_point"])
        nq = refs["inputs_q"].shape[0]
        check(nq >= 1 and np.array_equal(refs["inputs_q"], xq[:nq]), f"{name}: inputs_q")
        logits = np.stack([int8_ref.run(man, params, xq[i]) for i in range(n)])
        check(refs["logits"].dtype == np.int8 and np.array_equal(refs["logits"], logits[:nlog]), f"{name}: int8 logits")
        check(np.array_equal(refs["classes"], int8_ref.argmax_classes(logits)), f"{name}: int8 classes")
    else:
        logits = export.fp32_logits(man, params, x)
        check(refs["logits"].dtype == np.float32, f"{name}: logits dtype")
        check(np.array_equal(refs["logits"].view(np.uint32), logits[:nlog].view(np.uint32)), f"{name}: fp32 logits (torch)")
        check(np.array_equal(refs["classes"], int8_ref.argmax_classes(logits)), f"{name}: fp32 classes (torch)")
        if not (fast and man["size"] == "small"):
            for i in range(nlog):
                alt = export.fp32_logits_numpy(man, params, x[i])
                check(export.fp32_close(alt, refs["logits"][i]), f"{name}: numpy fp32 image {i} outside tolerance")
                check(near_tie_ok(int8_ref.argmax_classes(alt), refs["classes"][i], refs["logits"][i]),
                      f"{name}: numpy fp32 classes image {i}")
    keys = set()
    for f in faults:
        k = f["key"]
        keys.add(k)
        t = man["tensors"][[t["name"] for t in man["tensors"]].index(f["tensor"])]
        check(0 <= f["element"] < np.prod(t["shape"]), f"{name}: {k} element out of range")
        check(0 <= f["bit"] < 8 * np.dtype(NP[t["dtype"]]).itemsize, f"{name}: {k} bit out of range")
        check(0 <= f["input"] < n, f"{name}: {k} input out of range")
        fp = dict(params)
        fp[f["tensor"]] = export.flip(params[f["tensor"]], f["element"], f["bit"])
        ref = refs[f"{k}.logits"]
        if int8:
            got = int8_ref.run(man, fp, xq[f["input"]])
            check(np.array_equal(ref, got), f"{name}: {k} int8 fault logits")
        else:
            got = export.fp32_logits(man, fp, x[f["input"] : f["input"] + 1])[0]
            check(np.array_equal(ref.view(np.uint32), got.view(np.uint32)), f"{name}: {k} fp32 fault logits (torch)")
            if not (fast and man["size"] == "small"):
                alt = export.fp32_logits_numpy(man, fp, x[f["input"]])
                check(export.fp32_close(alt, ref), f"{name}: {k} numpy fp32 fault outside tolerance")
        check(np.array_equal(refs[f"{k}.classes"], int8_ref.argmax_classes(ref)), f"{name}: {k} classes")
    extra = {k.split(".")[0] for k in refs if k.startswith("fault")} - keys
    check(not extra, f"{name}: fault tensors without a json entry: {extra}")
    return faults


def _mbqm_scalar(x, m, shift):
    """Plain-Python MBQM straight from docs/models.md, to cross-check the vectorised one."""
    def i32(v):
        return ((v + 2**31) % 2**32) - 2**31

    shift = max(-31, min(30, shift))
    left, right = max(shift, 0), max(-shift, 0)
    a = i32(x << left)
    if a == m == -(2**31):
        h = 2**31 - 1
    else:
        ab = a * m
        nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
        h = int((ab + nudge) / 2**31) if abs(ab + nudge) < 2**52 else (abs(ab + nudge) >> 31) * (1 if ab + nudge >= 0 else -1)
    mask = (1 << right) - 1
    rem = h & mask
    thr = (mask >> 1) + (1 if h < 0 else 0)
    return (h >> right) + (1 if rem > thr else 0)


def check_arith():
    rng = np.random.default_rng(5)
    edge = [0, 1, -1, 2**31 - 1, -(2**31), 2**30, -(2**30), 12345, -54321]
    xs = edge + rng.integers(-(2**31), 2**31, 300).tolist()
    ms = edge + rng.integers(-(2**31), 2**31, 40).tolist()
    shifts = [-40, -31, -17, -1, 0, 1, 7, 30, 31, 2**31 - 1, -(2**31)]
    for m in ms:
        for sh in shifts:
            got = int8_ref.mbqm(np.array(xs, np.int64), m, sh)
            want = [_mbqm_scalar(x, m, sh) for x in xs]
            if not check(got.tolist() == want, f"mbqm mismatch m={m} shift={sh}"):
                return
    v = np.array([0.5, -0.5, 1.5, -2.5, 0.49999997, -0.49999997, 2.4999998], np.float32)
    check(int8_ref.round_half_away(v).tolist() == [1, -1, 2, -3, 0, 0, 2], "round_half_away")


def check_module(man, x, name):
    """When the training checkpoint is at hand: the manifest graph computes what the
    trained nn.Module computes (fp32 stages), so the files describe the trained model."""
    ck = os.path.join("/work/cache/models", f"{name}.pt")
    if man["stage"] == "int8" or not os.path.exists(ck):
        return
    from train import load_ckpt

    model, _ = load_ckpt(ck)
    refs = load_file(os.path.join(OUT, "refs", f"{name}.safetensors"))
    nlog = refs["logits"].shape[0]
    with torch.no_grad():
        out = model(torch.from_numpy(x[:nlog])).numpy()
    check(export.fp32_close(out, refs["logits"], 1e-4), f"{name}: nn.Module disagrees with the manifest graph")


def main():
    fast = "--fast" in sys.argv
    check_arith()
    torch.set_num_threads(1)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT, "**", "*"), recursive=True) if os.path.isfile(p))
    print(f"board-images/models: {total / 1e6:.2f} MB")
    check(total < MAX_BYTES, f"total size {total} >= 40 MiB")
    for size in ("tiny", "small"):
        tp = os.path.join(OUT, f"testset-{size}.safetensors")
        if not os.path.exists(tp):
            continue
        ts = load_file(tp)
        x, y = ts["inputs"], ts["labels"]
        check(x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 25, f"testset-{size} inputs")
        check(y.dtype == np.uint8 and y.shape == (x.shape[0],) + x.shape[2:] and y.max() <= 5, f"testset-{size} labels")
        for mp in sorted(glob.glob(os.path.join(OUT, f"{size}-*.json"))):
            name = os.path.basename(mp)[:-5]
            man = json.load(open(mp))
            params = load_file(os.path.join(OUT, f"{name}.safetensors"))
            check_manifest(man, params, name)
            check(man["input"]["shape"] == [25] + list(x.shape[2:]), f"{name}: input shape vs testset")
            faults = check_refs(man, params, x, name, fast)
            check_module(man, x, name)
            print(f"{name}: ok so far ({len(failures)} failures), {len(man['tensors'])} tensors, "
                  f"{man['params_bytes']} B, {len(faults)} faults", flush=True)
    if failures:
        print(f"{len(failures)} FAILURES")
        sys.exit(1)
    print("selfcheck passed")


if __name__ == "__main__":
    main()
