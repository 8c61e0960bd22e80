"""Small fault-injection sanity study on the shipped tiny models (Python peer side).

    /work/pyenv/bin/python tools/models/fault_study.py [N]

For each tiny fp32 model: N random single-bit flips in bit 30 (exponent MSB) of a random
weight/bias/BN parameter, and N in a random mantissa bit (0..22); for each int8 model N
random single-bit flips anywhere in the parameter blob's tensors.  A run is a failure when
any pixel's class differs from the fault-free class map (the paper's criterion), on test
image 0.  Prints failure rates and non-finite counts.  Seeded.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

import export
import int8_ref
from train import OUT


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    torch.set_num_threads(1)
    x = load_file(os.path.join(OUT, "testset-tiny.safetensors"))["inputs"][:1]
    rng = np.random.default_rng(7)
    for act in ("relu", "sigmoid", "hardsigmoid"):
        for stage in ("fp32", "pruned", "int8"):
            name = f"tiny-{act}-{stage}"
            man = json.load(open(os.path.join(OUT, f"{name}.json")))
            params = load_file(os.path.join(OUT, f"{name}.safetensors"))
            names = [t["name"] for t in man["tensors"] if t["kind"] not in ("bn_mean", "bn_var")]
            sizes = np.array([params[t].size for t in names], np.float64)
            if stage == "int8":
                qi = man["input"]["quant"]
                xq = int8_ref.quantize_input(x[0], qi["scale"], qi["zero_point"])
                gold = int8_ref.argmax_classes(int8_ref.run(man, params, xq))
                fails = 0
                bits = np.zeros(32)
                for _ in range(n):
                    t = names[rng.choice(len(names), p=sizes / sizes.sum())]
                    e = int(rng.integers(params[t].size))
                    b = int(rng.integers(8 * params[t].dtype.itemsize))
                    fp = dict(params)
                    fp[t] = export.flip(params[t], e, b)
                    cls = int8_ref.argmax_classes(int8_ref.run(man, fp, xq))
                    fails += bool((cls != gold).any())
                print(f"{name}: {n} random bit flips: {fails / n:.3f} fail (int8 outputs are integers: never non-finite)")
                continue
            gold = int8_ref.argmax_classes(export.fp32_logits(man, params, x)[0])
            for label, bitsel in (("bit 30", lambda: 30), ("mantissa", lambda: int(rng.integers(0, 23)))):
                fails = nonfinite = 0
                for _ in range(n):
                    t = names[rng.choice(len(names), p=sizes / sizes.sum())]
                    e = int(rng.integers(params[t].size))
                    fp = dict(params)
                    fp[t] = export.flip(params[t], e, bitsel())
                    lg = export.fp32_logits(man, fp, x)[0]
                    nonfinite += bool((~np.isfinite(lg)).any())
                    fails += bool((int8_ref.argmax_classes(lg) != gold).any())
                print(f"{name}: {n} flips in {label}: {fails / n:.3f} fail, {nonfinite / n:.3f} with non-finite logits",
                      flush=True)


if __name__ == "__main__":
    main()
