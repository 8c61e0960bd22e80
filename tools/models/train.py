"""Train, prune, quantise and export the U-Nets (run by hand, not in CI).

    /work/pyenv/bin/python tools/models/train.py --size tiny            # all 3 AFs
    /work/pyenv/bin/python tools/models/train.py --size small --acts relu
    /work/pyenv/bin/python tools/models/train.py --size tiny --quick    # minutes, for plumbing

Per (size, AF): train fp32 (class-weighted CE, unlabelled ignored), two-step L1-norm
filter pruning (per-layer sensitivity at ratios 0..0.9 -> per-layer ratio, prune,
fine-tune), post-training int8 quantisation of the pruned model, then export of the
three stages with references into board-images/models/.  Checkpoints go to
--cache (outside the repo) so --export-only can rewrite files without retraining.
Uses one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import export
import hsi_data
import quantize
import unet

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "board-images", "models")

# size -> (train images, val images, epochs, fine-tune epochs, batch, lr)
PLANS = {
    "tiny": dict(ntrain=1600, nval=64, epochs=30, ft_epochs=10, batch=16, lr=3e-3),
    "small": dict(ntrain=400, nval=16, epochs=12, ft_epochs=3, batch=8, lr=2e-3),
}
QUICK = {
    "tiny": dict(ntrain=256, nval=32, epochs=4, ft_epochs=1, batch=16, lr=3e-3),
    "small": dict(ntrain=32, nval=4, epochs=1, ft_epochs=1, batch=8, lr=2e-3),
}
SENS_TOL = 0.02  # max val score drop accepted when pruning one layer alone
RATIOS = [i / 10 for i in range(10)]


def confusion(pred, lab):
    """6x6 confusion counts over labelled pixels (rows truth, cols prediction)."""
    m = lab > 0
    return np.bincount(lab[m].astype(np.int64) * 6 + pred[m].astype(np.int64), minlength=36).reshape(6, 6)


def iou_scores(conf):
    """(GIoU, WIoU, per-class IoU) over classes 1..5 (unlabelled excluded).
    GIoU weights classes by their pixel frequency, WIoU by inverse frequency."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)[1:]
    n = conf[1:, :].sum(1)  # truth pixels per class (a prediction of 0 counts as wrong)
    iou = tp / np.maximum(n + conf[:, 1:].sum(0) - tp, 1)
    present = n > 0
    fw = np.where(present, n, 0) / n[present].sum()
    inv = np.where(present, 1 / np.maximum(n, 1), 0)
    iw = inv / inv.sum()
    return float((fw * iou).sum()), float((iw * iou).sum()), iou


def predict(model, x, batch=32):
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).argmax(1).numpy().astype(np.uint8))
    return np.concatenate(out)


def evaluate(model, x, y):
    return iou_scores(confusion(predict(model, x), y))


def class_weights(y):
    f = np.bincount(y.ravel(), minlength=6)[1:].astype(np.float64)
    f /= f.sum()
    w = np.median(f) / np.maximum(f, 1e-6)
    w = np.clip(w, 0.2, 10.0)  # median-frequency balancing, bounded
    return torch.tensor(np.concatenate([[0.0], w]), dtype=torch.float32)


def fit(model, x, y, epochs, batch, lr, cw, seed, log=""):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb, yb = xt[idx], yt[idx]
            flipm = torch.rand(len(idx), generator=g) < 0.5  # random horizontal flip
            xb = torch.where(flipm[:, None, None, None], xb.flip(-1), xb)
            yb = torch.where(flipm[:, None, None], yb.flip(-1), yb)
            loss = F.cross_entropy(model(xb), yb, weight=cw, ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        print(f"  {log} epoch {ep + 1}/{epochs} loss {tot / len(x):.4f}", flush=True)


def score(model, xv, yv):
    """Pruning criterion: mean of val GIoU and WIoU (WIoU protects the rare classes)."""
    g, w, _ = evaluate(model, xv, yv)
    return (g + w) / 2


def sensitivity(model, xv, yv):
    """Per-layer val score when only that layer is pruned at each ratio (no fine-tune)."""
    base = score(model, xv, yv)
    table = {}
    for name in model.prunable():
        l1 = unet.filter_l1(model, name)
        n = len(l1)
        row = []
        for r in RATIOS:
            k = max(1, n - int(round(r * n)))
            keep = sorted(torch.argsort(l1, descending=True)[:k].tolist())
            row.append(score(unet.pruned_copy(model, {name: keep}), xv, yv))
        table[name] = row
    return base, table


def choose_ratios(base, table):
    ratios = {}
    for name, row in table.items():
        ok = [r for r, g in zip(RATIOS, row) if base - g <= SENS_TOL]
        ratios[name] = max(ok) if ok else 0.0
    return ratios


def prune(model, ratios):
    keep = {}
    for name, r in ratios.items():
        l1 = unet.filter_l1(model, name)
        n = len(l1)
        k = max(1, n - int(round(r * n)))
        keep[name] = sorted(torch.argsort(l1, descending=True)[:k].tolist())
    return unet.pruned_copy(model, keep)


def save_ckpt(path, model, extra):
    torch.save(dict(size=model.size, act=model.act, widths=model.widths, state=model.state_dict(), extra=extra), path)


def load_ckpt(path):
    c = torch.load(path, weights_only=False)
    m = unet.UNet(c["size"], c["act"], c["widths"])
    m.load_state_dict(c["state"])
    m.eval()
    return m, c["extra"]


def fp32_tensors(model):
    nodes, ts = unet.fp32_graph(model)
    return nodes, {n: (layer, kind, arr) for n, layer, kind, arr in ts}


def export_all(size, act, fp, pr, calib_x, test_x, test_y, results):
    """Export the three stages of one (size, act); append metrics to results."""
    row = {}
    cls = {}
    for stage, model in (("fp32", fp), ("pruned", pr)):
        name = f"{size}-{act}-{stage}"
        nodes, ts = fp32_tensors(model)
        man = export.write_model(OUT, name, size, act, stage, nodes, ts)
        params = {k: v[2] for k, v in ts.items()}
        classes, _ = export.write_refs(OUT, man, params, test_x, size)
        cls[stage] = classes
        g, w, _ = iou_scores(confusion(classes, test_y))
        row[stage] = dict(giou=g, wiou=w, params=int(sum(v[2].size for v in ts.values())),
                          bytes=man["params_bytes"])
        print(f"  {name}: GIoU {g:.4f} WIoU {w:.4f} params_bytes {man['params_bytes']}", flush=True)
    inq, outq, nodes, ts = quantize.quantize(pr, calib_x)
    name = f"{size}-{act}-int8"
    man = export.write_model(OUT, name, size, act, "int8", nodes, ts, inq, outq)
    params = {k: v[2] for k, v in ts.items()}
    classes, _ = export.write_refs(OUT, man, params, test_x, size)
    g, w, _ = iou_scores(confusion(classes, test_y))
    lab = test_y > 0
    row["int8"] = dict(giou=g, wiou=w, params=int(sum(v[2].size for v in ts.values())), bytes=man["params_bytes"],
                       agree_pruned=float((classes == cls["pruned"]).mean()),
                       agree_fp32=float((classes == cls["fp32"]).mean()),
                       agree_pruned_labelled=float((classes == cls["pruned"])[lab].mean()))
    print(f"  {name}: GIoU {g:.4f} WIoU {w:.4f} agreement with pruned {row['int8']['agree_pruned']:.4f}", flush=True)
    results[f"{size}-{act}"] = row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--acts", default="relu,sigmoid,hardsigmoid")
    ap.add_argument("--quick", action="store_true", help="few epochs, for plumbing tests")
    ap.add_argument("--export-only", action="store_true", help="re-export from cached checkpoints")
    ap.add_argument("--cache", default="/work/cache/models")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    plan = (QUICK if args.quick else PLANS)[args.size]
    size = args.size
    t0 = time.time()

    test_x, test_y = hsi_data.test_set(size)
    export.write_testset(OUT, size, test_x, test_y)
    if not args.export_only:
        xtr, ytr = hsi_data.make_set(hsi_data.TRAIN_SEED, plan["ntrain"], size)
        xv, yv = hsi_data.make_set(hsi_data.VAL_SEED, plan["nval"], size)
        cw = class_weights(ytr)
        print(f"data {size}: train {xtr.shape} in {time.time() - t0:.0f}s; class weights {cw.numpy().round(2)}", flush=True)
    calib_x = hsi_data.make_set(hsi_data.TRAIN_SEED, 64, size)[0]  # first training scenes

    res_path = os.path.join(args.cache, f"results-{size}.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    for act in args.acts.split(","):
        ck_fp = os.path.join(args.cache, f"{size}-{act}-fp32.pt")
        ck_pr = os.path.join(args.cache, f"{size}-{act}-pruned.pt")
        if not args.export_only:
            torch.manual_seed(17)
            model = unet.UNet(size, act)
            fit(model, xtr, ytr, plan["epochs"], plan["batch"], plan["lr"], cw, seed=1, log=f"{size}-{act} fp32")
            gv = evaluate(model, xv, yv)[0]
            print(f"  val GIoU {gv:.4f} ({time.time() - t0:.0f}s)", flush=True)
            base, table = sensitivity(model, xv, yv)
            ratios = choose_ratios(base, table)
            print(f"  sensitivity done ({time.time() - t0:.0f}s); ratios {ratios}", flush=True)
            pr = prune(model, ratios)
            print(f"  pruned val GIoU before fine-tune {evaluate(pr, xv, yv)[0]:.4f}", flush=True)
            fit(pr, xtr, ytr, plan["ft_epochs"], plan["batch"], plan["lr"] / 3, cw, seed=2, log=f"{size}-{act} ft")
            extra = dict(sensitivity=table, base=base, ratios=ratios, plan=plan)
            save_ckpt(ck_fp, model, extra)
            save_ckpt(ck_pr, pr, extra)
        model, extra = load_ckpt(ck_fp)
        pr, _ = load_ckpt(ck_pr)
        export_all(size, act, model, pr, calib_x, test_x, test_y, results)
        results[f"{size}-{act}"]["ratios"] = extra["ratios"]
        results[f"{size}-{act}"]["widths"] = pr.widths
        results[f"{size}-{act}"]["plan"] = extra["plan"]
        json.dump(results, open(res_path, "w"), indent=1)
        print(f"{size}-{act} done at {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
