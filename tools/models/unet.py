"""U-Net for hyperspectral segmentation, its graph description, filter pruning.

Topology (as in the paper, scaled down): per level two (3x3 conv, batch-norm, AF),
2x2 max-pool between encoder levels, 2x2 stride-2 transposed conv up (no AF after it),
skip concatenation [skip, up], two (3x3 conv, BN, AF) per decoder level, final 1x1
conv to 6 logits.  `depth` counts the encoder levels including the bottleneck ("mid"):
tiny = depth 3 (8, 16, mid 32), small = depth 4 (16, 32, 64, mid 128).

Every layer's width lives in `widths`, so a pruned network is the same class with
smaller widths.  Layer names are the manifest's node names (docs/models.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = ("relu", "sigmoid", "hardsigmoid")
CONFIGS = {"tiny": (3, 8), "small": (4, 16)}  # size -> (depth, base filters)
IN_BANDS = 25
NUM_CLASSES = 6
BN_EPS = 1e-5


def act_fn(name):
    return {"relu": F.relu, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}[name]


def level_names(depth):
    enc = [f"enc{l}" for l in range(depth - 1)]
    dec = [f"dec{l}" for l in reversed(range(depth - 1))]
    return enc, "mid", dec


def default_widths(depth, base):
    w = {}
    enc, mid, dec = level_names(depth)
    for l, e in enumerate(enc):
        w[f"{e}.conv0"] = w[f"{e}.conv1"] = base << l
    w[f"{mid}.conv0"] = w[f"{mid}.conv1"] = base << (depth - 1)
    for d in dec:
        l = int(d[3:])
        w[f"{d}.up"] = w[f"{d}.conv0"] = w[f"{d}.conv1"] = base << l
    return w


def input_sources(depth, layer):
    """Producers whose outputs (concatenated in order) form `layer`'s input; [] = network input."""
    lvl, kind = layer.split(".") if "." in layer else (layer, "")
    if layer == "head":
        return ["dec0.conv1"]
    if lvl.startswith("enc") or lvl == "mid":
        if kind == "conv1":
            return [f"{lvl}.conv0"]
        l = depth - 1 if lvl == "mid" else int(lvl[3:])
        return [] if l == 0 else [f"enc{l - 1}.conv1"]
    l = int(lvl[3:])
    if kind == "up":
        return ["mid.conv1"] if l == depth - 2 else [f"dec{l + 1}.conv1"]
    if kind == "conv0":
        return [f"enc{l}.conv1", f"{lvl}.up"]
    return [f"{lvl}.conv0"]


class UNet(nn.Module):
    def __init__(self, size, act, widths=None):
        super().__init__()
        self.size, self.act = size, act
        self.depth, base = CONFIGS[size]
        self.widths = dict(widths or default_widths(self.depth, base))
        self.conv = nn.ModuleDict()
        self.bn = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for name in self.prunable() + ["head"]:
            cin = sum(self.widths[s] for s in input_sources(self.depth, name)) or IN_BANDS
            key = name.replace(".", "_")
            if name.endswith(".up"):
                self.up[key] = nn.ConvTranspose2d(cin, self.widths[name], 2, stride=2)
            elif name == "head":
                self.conv[key] = nn.Conv2d(cin, NUM_CLASSES, 1)
            else:
                self.conv[key] = nn.Conv2d(cin, self.widths[name], 3, padding=1)
                self.bn[key] = nn.BatchNorm2d(self.widths[name], eps=BN_EPS)

    def prunable(self):
        """Every layer with filters, in graph order; the head is excluded (class count fixed)."""
        enc, mid, dec = level_names(self.depth)
        out = []
        for e in enc + [mid]:
            out += [f"{e}.conv0", f"{e}.conv1"]
        for d in dec:
            out += [f"{d}.up", f"{d}.conv0", f"{d}.conv1"]
        return out

    def _block(self, name, x):
        k = name.replace(".", "_")
        return act_fn(self.act)(self.bn[k](self.conv[k](x)))

    def forward(self, x):
        enc, mid, dec = level_names(self.depth)
        skips = []
        for e in enc:
            x = self._block(f"{e}.conv1", self._block(f"{e}.conv0", x))
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self._block(f"{mid}.conv1", self._block(f"{mid}.conv0", x))
        for d in dec:
            u = self.up[f"{d}_up"](x)
            x = torch.cat([skips[int(d[3:])], u], 1)
            x = self._block(f"{d}.conv1", self._block(f"{d}.conv0", x))
        return self.conv["head"](x)

    # ---- parameters by manifest name -------------------------------------------------
    def layer_params(self, name):
        """(weight, bias) tensors of a conv/up layer."""
        k = name.replace(".", "_")
        m = self.up[k] if name.endswith(".up") else self.conv[k]
        return m.weight, m.bias

    def bn_of(self, name):
        return self.bn[name.replace(".", "_")]


def filter_l1(model, name):
    w, _ = model.layer_params(name)
    w = w.detach()
    return w.abs().sum(dim=(0, 2, 3)) if name.endswith(".up") else w.abs().sum(dim=(1, 2, 3))


def pruned_copy(model, keep):
    """A new UNet with the filters of `keep` {layer: sorted kept indices}; others whole."""
    widths = dict(model.widths)
    for k, idx in keep.items():
        widths[k] = len(idx)
    new = UNet(model.size, model.act, widths)
    dev_keep = {n: torch.as_tensor(keep.get(n, range(model.widths[n])), dtype=torch.long) for n in model.widths}

    def in_index(name):
        srcs = input_sources(model.depth, name)
        if not srcs:
            return torch.arange(IN_BANDS)
        parts, off = [], 0
        for s in srcs:
            parts.append(dev_keep[s] + off)
            off += model.widths[s]
        return torch.cat(parts)

    with torch.no_grad():
        for name in model.prunable() + ["head"]:
            w, b = model.layer_params(name)
            nw, nb = new.layer_params(name)
            ii = in_index(name)
            oi = dev_keep[name] if name != "head" else torch.arange(NUM_CLASSES)
            if name.endswith(".up"):
                nw.copy_(w[ii][:, oi])
            else:
                nw.copy_(w[oi][:, ii])
            nb.copy_(b[oi])
            if name in model.widths and not name.endswith(".up"):
                ob, nbn = model.bn_of(name), new.bn_of(name)
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(nbn, attr).copy_(getattr(ob, attr)[oi])
    return new


# ---- fp32 graph (manifest nodes + tensors) ---------------------------------------------
def fp32_graph(model):
    """Nodes (manifest dicts without quant fields) and tensors [(name, layer, kind, array)]."""
    depth, act = model.depth, model.act
    enc, mid, dec = level_names(depth)
    nodes, tensors = [], []
    H, W = {"tiny": (32, 64), "small": (96, 192)}[model.size]

    def t(name, layer, kind, v):
        tensors.append((name, layer, kind, v.detach().cpu().numpy().astype("float32")))
        return name

    def block(name, src, h, w):
        lvl, c = name.split(".")
        i = c[-1]
        wt, b = model.layer_params(name)
        cout = wt.shape[0]
        nodes.append(dict(name=name, op="conv2d", inputs=[src], out_shape=[cout, h, w],
                          attrs=dict(kernel=3, padding=1),
                          params=dict(weight=t(f"{name}.weight", name, "weight", wt),
                                      bias=t(f"{name}.bias", name, "bias", b))))
        bn = model.bn_of(name)
        bname = f"{lvl}.bn{i}"
        nodes.append(dict(name=bname, op="batchnorm", inputs=[name], out_shape=[cout, h, w],
                          attrs=dict(eps=BN_EPS),
                          params=dict(gamma=t(f"{bname}.gamma", bname, "bn_gamma", bn.weight),
                                      beta=t(f"{bname}.beta", bname, "bn_beta", bn.bias),
                                      mean=t(f"{bname}.mean", bname, "bn_mean", bn.running_mean),
                                      var=t(f"{bname}.var", bname, "bn_var", bn.running_var))))
        aname = f"{lvl}.act{i}"
        nodes.append(dict(name=aname, op=act, inputs=[bname], out_shape=[cout, h, w], attrs={}, params={}))
        return aname

    src, h, w = "input", H, W
    skips = []
    for e in enc:
        src = block(f"{e}.conv1", block(f"{e}.conv0", src, h, w), h, w)
        skips.append((src, model.widths[f"{e}.conv1"]))
        h, w = h // 2, w // 2
        nodes.append(dict(name=f"{e}.pool", op="maxpool2", inputs=[src],
                          out_shape=[model.widths[f"{e}.conv1"], h, w], attrs={}, params={}))
        src = f"{e}.pool"
    src = block(f"{mid}.conv1", block(f"{mid}.conv0", src, h, w), h, w)
    for d in dec:
        l = int(d[3:])
        h, w = h * 2, w * 2
        wt, b = model.layer_params(f"{d}.up")
        cu = wt.shape[1]
        nodes.append(dict(name=f"{d}.up", op="convtranspose2", inputs=[src], out_shape=[cu, h, w], attrs={},
                          params=dict(weight=t(f"{d}.up.weight", f"{d}.up", "weight", wt),
                                      bias=t(f"{d}.up.bias", f"{d}.up", "bias", b))))
        sk, cs = skips[l]
        nodes.append(dict(name=f"{d}.cat", op="concat", inputs=[sk, f"{d}.up"], out_shape=[cs + cu, h, w],
                          attrs={}, params={}))
        src = block(f"{d}.conv1", block(f"{d}.conv0", f"{d}.cat", h, w), h, w)
    wt, b = model.layer_params("head")
    nodes.append(dict(name="head", op="conv2d", inputs=[src], out_shape=[NUM_CLASSES, H, W],
                      attrs=dict(kernel=1, padding=0),
                      params=dict(weight=t("head.weight", "head", "weight", wt),
                                  bias=t("head.bias", "head", "bias", b))))
    return nodes, tensors


def run_fp32_graph(nodes, params, x):
    """Run an fp32 manifest graph with PyTorch ops (float32, eval semantics).

    `params` maps tensor name -> torch tensor; `x` is [N,25,H,W].  This is the
    reference for the fp32 datapath (and for faulty parameters)."""
    vals = {"input": x}
    for n in nodes:
        a = [vals[i] for i in n["inputs"]]
        p = {r: params[t] for r, t in n["params"].items()}
        op = n["op"]
        if op == "conv2d":
            y = F.conv2d(a[0], p["weight"], p["bias"], padding=n["attrs"]["padding"])
        elif op == "batchnorm":
            y = F.batch_norm(a[0], p["mean"], p["var"], p["gamma"], p["beta"], False, 0.0, n["attrs"]["eps"])
        elif op in ACTS:
            y = act_fn(op)(a[0])
        elif op == "maxpool2":
            y = F.max_pool2d(a[0], 2)
        elif op == "convtranspose2":
            y = F.conv_transpose2d(a[0], p["weight"], p["bias"], stride=2)
        elif op == "concat":
            y = torch.cat(a, 1)
        else:
            raise ValueError(f"node {n['name']}: op {op} is not an fp32 op")
        vals[n["name"]] = y
    return vals
