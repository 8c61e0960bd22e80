//! Fast faulty inference. The engine keeps the pristine parameters and, per input, the
//! golden activations (and int8 accumulators). A run diffs the parameter blob against
//! pristine tensor by tensor, then walks the graph tracking, per value, the exact list
//! of elements that differ from golden:
//!
//! - a node with no changed parameters and clean inputs is skipped;
//! - a node whose own parameters changed recomputes only the output channels those
//!   parameter elements feed (int8: by adding the weight/bias delta to the golden
//!   accumulators, exact under wrapping arithmetic);
//! - a node with dirty inputs recomputes only the output elements those inputs reach
//!   (int8 convs scatter `w·(new − old)` into golden accumulators; fp32 convs gather
//!   the affected outputs afresh in the dense kernel's order);
//! - each recomputed element is compared with golden, so masked faults stop spreading.
//!
//! When the dirty region gets large a node falls back to the dense kernel. The result
//! is bit-identical to `run_full` (tested on many thousands of random faults).

use super::exec::{self, Buf, Scratch, concat_at, dense_node, maxpool_at};
use super::model::{Kind, Model, Params, Precision, RNode};
use super::requant::Requant;
use super::{DatapathError, Upset, fp32};
use std::sync::Arc;

/// Golden state of one input.
struct Entry {
    hash: u64,
    input: Vec<u8>,
    gold: Vec<Buf>,
    /// Working copy; equal to `gold` between runs.
    cur: Vec<Buf>,
    /// int8 conv / transposed-conv accumulators per node (empty for other nodes).
    gold_acc: Vec<Vec<i32>>,
    /// Working copy of the accumulators; equal to `gold_acc` between node updates.
    cur_acc: Vec<Vec<i32>>,
    /// fp32 conv partial sums at the node's input-channel checkpoints.
    gold_prefix: Vec<Vec<Vec<f32>>>,
    out_bytes: Vec<u8>,
    last_used: u64,
    bytes: usize,
}

/// Counters since the engine was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub runs: u64,
    /// Runs whose parameters equalled pristine and had no upsets.
    pub runs_pristine: u64,
    /// Runs whose output equalled golden (fault masked).
    pub runs_masked: u64,
    pub nodes_skipped: u64,
    /// Nodes recomputed on part of their output.
    pub nodes_partial: u64,
    /// Nodes recomputed whole.
    pub nodes_dense: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Changed parameters of one node.
struct NodeChange {
    params: Params,
    /// (tensor index, changed element indices).
    elems: Vec<(usize, Vec<usize>)>,
}

/// Golden caches above this many bytes evict the least recently used input.
const CACHE_BUDGET: usize = 512 << 20;
/// int8 conv with dirty inputs: the channel-last scatter is used while the dirty
/// elements are fewer than 1/SCATTER_DIV of the dirty rows' elements (measured: the
/// scatter costs several dense MACs per dirty element and tap).
const SCATTER_DIV: usize = 8;
/// int8 conv: more dirty (channel, row) pairs than this percentage: dense.
const ROWS_PCT: usize = 60;
/// More changed parameter elements than this in one node: recompute it whole.
const MAX_SPARSE_PARAM_ELEMS: usize = 64;

pub struct Engine {
    model: Arc<Model>,
    entries: Vec<Entry>,
    clock: u64,
    stats: EngineStats,
    scratch: Scratch,
    /// Per value: elements that differ from golden in the current run (sorted)...
    dirty: Vec<Vec<u32>>,
    /// ...or, when set, more than half of them (no list kept).
    all: Vec<bool>,
    /// Stamp-based membership marks, sized to the largest value.
    marks: Vec<u32>,
    stamp: u32,
    cand: Vec<u32>,
    pix: Vec<u32>,
    /// Dirty (channel, row) marks of a conv input, dirty channels, output rows reached.
    rows: Vec<bool>,
    chans: Vec<usize>,
    orows: Vec<bool>,
    /// Channel-last accumulator deltas `[pixel][cout]` of the int8 scatter.
    delta: Vec<i32>,
}

fn fast_hash(b: &[u8]) -> u64 {
    // FxHash-style over every 16th 8-byte word (inputs are tens of KB and hashed on
    // every run); a hit is confirmed by comparing all bytes.
    let mut h: u64 = b.len() as u64;
    for c in b.chunks_exact(8).step_by(16) {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    for &x in b.chunks_exact(8).remainder() {
        h = (h.rotate_left(5) ^ x as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    h
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Engine {
        let nvals = model.nodes.len() + 1;
        let maxlen = model
            .nodes
            .iter()
            .map(RNode::out_len)
            .chain([model.input_shape.iter().product()])
            .max()
            .unwrap_or(0);
        Engine {
            model,
            entries: Vec::new(),
            clock: 0,
            stats: EngineStats::default(),
            scratch: Scratch::default(),
            dirty: vec![Vec::new(); nvals],
            all: vec![false; nvals],
            marks: vec![0; maxlen],
            stamp: 0,
            cand: Vec::new(),
            pix: Vec::new(),
            rows: Vec::new(),
            chans: Vec::new(),
            orows: Vec::new(),
            delta: Vec::new(),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Full recomputation from `params` and `input` (accelerator-memory layouts: f32 LE
    /// or i8). Returns the output bytes (f32 LE logits, NaNs canonical, or i8 logits).
    pub fn run_full(
        &self,
        params: &[u8],
        input: &[u8],
        upsets: &[Upset],
    ) -> Result<Vec<u8>, DatapathError> {
        let m = &*self.model;
        exec::check_sizes(m, params, input)?;
        exec::check_upsets(m, upsets)?;
        let decoded: Vec<Params> = (0..m.nodes.len()).map(|i| m.decode(i, params)).collect();
        let vals = exec::run_dense(
            m,
            &decoded,
            Buf::from_input(m.precision, input),
            upsets,
            None,
        );
        Ok(vals[m.output].to_bytes())
    }

    /// Same result as `run_full`, reusing the input's golden activations.
    pub fn run(
        &mut self,
        params: &[u8],
        input: &[u8],
        upsets: &[Upset],
    ) -> Result<Vec<u8>, DatapathError> {
        let model = Arc::clone(&self.model);
        let m = &*model;
        exec::check_sizes(m, params, input)?;
        exec::check_upsets(m, upsets)?;
        self.stats.runs += 1;
        let ei = self.entry(input);
        let changes = diff(m, params);
        if changes.iter().all(Option::is_none) && upsets.is_empty() {
            self.stats.runs_pristine += 1;
            return Ok(self.entries[ei].out_bytes.clone());
        }
        let mut entry = std::mem::replace(&mut self.entries[ei], placeholder());
        for (i, n) in m.nodes.iter().enumerate() {
            let v = i + 1;
            let in_dirty = n
                .inputs
                .iter()
                .any(|&u| self.all[u] || !self.dirty[u].is_empty());
            let ups = upsets.iter().any(|u| u.node == i);
            match (&changes[i], in_dirty) {
                (None, false) => self.stats.nodes_skipped += 1,
                (Some(ch), false) if !too_many(ch) => {
                    self.stats.nodes_partial += 1;
                    self.own_change(m, i, ch, &mut entry);
                }
                // Inputs that differ almost everywhere: no element lists to follow.
                (None, true) if n.inputs.iter().any(|&u| self.all[u]) => {
                    self.dense_pristine(m, i, &mut entry)
                }
                (None, true) => self.input_change(m, i, &mut entry),
                (Some(ch), true) => {
                    self.dense(m, i, &ch.params, &mut entry);
                }
                (Some(ch), false) => {
                    self.dense(m, i, &ch.params, &mut entry);
                }
            }
            if ups {
                let cur = &mut entry.cur[v];
                if self.all[v] {
                    for u in upsets.iter().filter(|u| u.node == i) {
                        cur.flip(u.element, u.bit);
                    }
                    continue;
                }
                for u in upsets.iter().filter(|u| u.node == i) {
                    cur.flip(u.element, u.bit);
                }
                let d = &mut self.dirty[v];
                d.extend(
                    upsets
                        .iter()
                        .filter(|u| u.node == i)
                        .map(|u| u.element as u32),
                );
                d.sort_unstable();
                d.dedup();
                d.retain(|&e| !cur.same_at(&entry.gold[v], e as usize));
            }
        }
        let out = if !self.all[m.output] && self.dirty[m.output].is_empty() {
            self.stats.runs_masked += 1;
            entry.out_bytes.clone()
        } else {
            entry.cur[m.output].to_bytes()
        };
        // Restore the working copy to golden.
        for (v, d) in self.dirty.iter_mut().enumerate() {
            if std::mem::take(&mut self.all[v]) {
                match (&mut entry.cur[v], &entry.gold[v]) {
                    (Buf::F32(c), Buf::F32(g)) => c.copy_from_slice(g),
                    (Buf::I8(c), Buf::I8(g)) => c.copy_from_slice(g),
                    _ => {}
                }
            }
            if d.is_empty() {
                continue;
            }
            match (&mut entry.cur[v], &entry.gold[v]) {
                (Buf::F32(c), Buf::F32(g)) => d.iter().for_each(|&e| c[e as usize] = g[e as usize]),
                (Buf::I8(c), Buf::I8(g)) => d.iter().for_each(|&e| c[e as usize] = g[e as usize]),
                _ => {}
            }
            d.clear();
        }
        self.entries[ei] = entry;
        Ok(out)
    }

    /// Index of the golden entry for `input`, computing it on a miss.
    fn entry(&mut self, input: &[u8]) -> usize {
        self.clock += 1;
        let h = fast_hash(input);
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.hash == h && e.input == input)
        {
            self.stats.cache_hits += 1;
            self.entries[i].last_used = self.clock;
            return i;
        }
        self.stats.cache_misses += 1;
        let m = &*self.model;
        let (mut accs, mut prefixes) = (Vec::new(), Vec::new());
        let gold = exec::run_dense(
            m,
            &m.pristine_params,
            Buf::from_input(m.precision, input),
            &[],
            Some((&mut accs, &mut prefixes)),
        );
        let bytes = 2 * gold.iter().map(Buf::bytes).sum::<usize>()
            + 8 * accs.iter().map(Vec::len).sum::<usize>()
            + 4 * prefixes.iter().flatten().map(Vec::len).sum::<usize>()
            + input.len();
        let mut total: usize = self.entries.iter().map(|e| e.bytes).sum::<usize>() + bytes;
        while total > CACHE_BUDGET && !self.entries.is_empty() {
            let lru = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].last_used)
                .unwrap_or(0);
            total -= self.entries.swap_remove(lru).bytes;
        }
        let out_bytes = gold[m.output].to_bytes();
        self.entries.push(Entry {
            hash: h,
            input: input.to_vec(),
            cur: gold.clone(),
            gold,
            cur_acc: accs.clone(),
            gold_acc: accs,
            gold_prefix: prefixes,
            out_bytes,
            last_used: self.clock,
            bytes,
        });
        self.entries.len() - 1
    }

    fn next_stamp(&mut self) -> u32 {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.marks.fill(0);
            self.stamp = 1;
        }
        self.stamp
    }

    /// Dense recomputation of node `i` with parameters `p`; dirty = all differing, or
    /// `all` when more than half differ (lists would cost more than they save).
    fn dense(&mut self, m: &Model, i: usize, p: &Params, e: &mut Entry) {
        self.stats.nodes_dense += 1;
        let v = i + 1;
        let (before, after) = e.cur.split_at_mut(v);
        dense_node(
            &m.nodes[i],
            p,
            before,
            &mut after[0],
            &mut self.scratch,
            None,
        );
        self.compare_all(v, e);
    }

    /// dirty[v] = every element of value `v` that differs from golden (or `all`).
    fn compare_all(&mut self, v: usize, e: &Entry) {
        let (cur, gold) = (&e.cur[v], &e.gold[v]);
        let d = &mut self.dirty[v];
        d.clear();
        let count = match (cur, gold) {
            (Buf::F32(c), Buf::F32(g)) => c
                .iter()
                .zip(g)
                .map(|(a, b)| usize::from(a.to_bits() != b.to_bits()))
                .sum(),
            (Buf::I8(c), Buf::I8(g)) => c.iter().zip(g).map(|(a, b)| usize::from(a != b)).sum(),
            _ => 0,
        };
        if count * 2 > cur.len() {
            self.all[v] = true;
            return;
        }
        d.resize(count + 1, 0);
        let mut n = 0;
        // Branch-free compaction: differences are scattered, a branch mispredicts often.
        match (cur, gold) {
            (Buf::F32(c), Buf::F32(g)) => {
                for (k, (a, b)) in c.iter().zip(g).enumerate() {
                    d[n.min(count)] = k as u32;
                    n += usize::from(a.to_bits() != b.to_bits());
                }
            }
            (Buf::I8(c), Buf::I8(g)) => {
                for (k, (a, b)) in c.iter().zip(g).enumerate() {
                    d[n.min(count)] = k as u32;
                    n += usize::from(a != b);
                }
            }
            _ => {}
        }
        d.truncate(count);
    }

    /// Sets dirty[v] to the candidates in `self.cand` (unique) that differ from golden.
    /// Dirty lists are kept sorted: the conv paths scan them row by row.
    fn settle(&mut self, v: usize, e: &Entry) {
        let d = &mut self.dirty[v];
        d.clear();
        d.resize(self.cand.len() + 1, 0);
        let mut n = 0;
        match (&e.cur[v], &e.gold[v]) {
            (Buf::F32(c), Buf::F32(g)) => {
                for &k in &self.cand {
                    d[n] = k;
                    n += usize::from(c[k as usize].to_bits() != g[k as usize].to_bits());
                }
            }
            (Buf::I8(c), Buf::I8(g)) => {
                for &k in &self.cand {
                    d[n] = k;
                    n += usize::from(c[k as usize] != g[k as usize]);
                }
            }
            _ => {}
        }
        d.truncate(n);
        if n * 2 > e.cur[v].len() {
            self.all[v] = true;
            d.clear();
            return;
        }
        if !d.is_sorted() {
            d.sort_unstable();
        }
    }

    /// Node `i`'s own parameters changed, its inputs are golden.
    fn own_change(&mut self, m: &Model, i: usize, ch: &NodeChange, e: &mut Entry) {
        let n = &m.nodes[i];
        let v = i + 1;
        let [co, oh, ow] = n.out;
        let ohw = oh * ow;
        let [ci, h, w] = n.in_shapes[0];
        // Output channels affected.
        let mut chans: Vec<usize> = Vec::new();
        for (t, els) in &ch.elems {
            for &el in els {
                let o = match (n.kind, Some(*t) == n.slots.weight) {
                    (Kind::Conv { k, .. }, true) => el / (ci * k * k),
                    (Kind::ConvT, true) => (el / 4) % co,
                    _ => el,
                };
                chans.push(o);
            }
        }
        chans.sort_unstable();
        chans.dedup();
        if n.kind == Kind::Lut {
            return self.dense(m, i, &ch.params, e);
        }
        let (before, after) = e.cur.split_at_mut(v);
        let out = &mut after[0];
        let x = &before[n.inputs[0]];
        match (&ch.params, &m.pristine_params[i]) {
            (Params::ConvF32 { w: wt, b }, _) => match n.kind {
                Kind::Conv { k, pad } => {
                    fp32::pad_input(x.f32(), ci, h, w, pad, &mut self.scratch.pad_f);
                    let g = fp32::ConvGeom {
                        cin: ci,
                        cout: co,
                        h,
                        w,
                        k,
                        pad,
                    };
                    let it = chans.iter().copied();
                    fp32::conv_dense(
                        g,
                        &self.scratch.pad_f,
                        wt,
                        b,
                        it,
                        out.f32_mut(),
                        &[],
                        &mut [],
                    );
                }
                _ => fp32::convt_dense(
                    ci,
                    co,
                    h,
                    w,
                    x.f32(),
                    wt,
                    b,
                    chans.iter().copied(),
                    out.f32_mut(),
                ),
            },
            (
                Params::Bn {
                    gamma,
                    beta,
                    mean,
                    denom,
                },
                _,
            ) => {
                let (xv, o) = (x.f32(), out.f32_mut());
                for &c in &chans {
                    for k in c * ohw..(c + 1) * ohw {
                        o[k] = fp32::bn(xv[k], mean[c], denom[c], gamma[c], beta[c]);
                    }
                }
            }
            (Params::ConvI8 { w: wt, b, rq }, Params::ConvI8 { w: w0, b: b0, .. }) => {
                let acc = &mut e.cur_acc[i];
                let zp = n.zp_in[0];
                let xv = x.i8();
                // Weight deltas scattered over the affected channel planes.
                if let Some(ws) = n.slots.weight
                    && let Some((_, els)) = ch.elems.iter().find(|(t, _)| *t == ws)
                {
                    for &el in els {
                        let dw = wt[el] as i32 - w0[el] as i32;
                        match n.kind {
                            Kind::Conv { k, pad } => {
                                let o = el / (ci * k * k);
                                let c = (el / (k * k)) % ci;
                                let (ky, kx) = ((el % (k * k)) / k, el % k);
                                let plane = &mut acc[o * ohw..][..ohw];
                                for y in 0..h {
                                    let iy = (y + ky).wrapping_sub(pad);
                                    if iy >= h {
                                        continue;
                                    }
                                    let row = &xv[(c * h + iy) * w..][..w];
                                    let dst = &mut plane[y * w..][..w];
                                    for (xx, d) in dst.iter_mut().enumerate() {
                                        let ix = (xx + kx).wrapping_sub(pad);
                                        if ix < w {
                                            *d = d.wrapping_add(dw * (row[ix] as i32 - zp));
                                        }
                                    }
                                }
                            }
                            _ => {
                                let (c, o, di, dj) =
                                    (el / (4 * co), (el / 4) % co, (el / 2) % 2, el % 2);
                                let plane = &mut acc[o * ohw..][..ohw];
                                for ii in 0..h {
                                    for j in 0..w {
                                        let d = &mut plane[(2 * ii + di) * ow + 2 * j + dj];
                                        *d = d.wrapping_add(
                                            dw * (xv[(c * h + ii) * w + j] as i32 - zp),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                if let Some(bs) = n.slots.bias
                    && let Some((_, els)) = ch.elems.iter().find(|(t, _)| *t == bs)
                {
                    for &o in els {
                        let db = b[o].wrapping_sub(b0[o]);
                        for a in &mut acc[o * ohw..][..ohw] {
                            *a = a.wrapping_add(db);
                        }
                    }
                }
                let o8 = out.i8_mut();
                for &o in &chans {
                    let r = o * ohw..(o + 1) * ohw;
                    super::int8::requant_plane(
                        &acc[r.clone()],
                        rq[o],
                        n.zp_out,
                        n.act_min,
                        n.act_max,
                        &mut o8[r.clone()],
                    );
                    acc[r.clone()].copy_from_slice(&e.gold_acc[i][r]);
                }
            }
            _ => {}
        }
        self.cand.clear();
        for &o in &chans {
            self.cand.extend((o * ohw) as u32..((o + 1) * ohw) as u32);
        }
        self.settle(v, e);
    }

    /// Node `i`'s parameters are pristine, some inputs differ from golden.
    fn input_change(&mut self, m: &Model, i: usize, e: &mut Entry) {
        let n = &m.nodes[i];
        let v = i + 1;
        let [co, oh, ow] = n.out;
        let ohw = oh * ow;
        let [ci, h, w] = n.in_shapes[0];
        let hw = h * w;
        let u = n.inputs[0];
        let p = &m.pristine_params[i];
        let (dhw, dw) = (FastDiv::new(hw), FastDiv::new(w));
        // Element-wise work over most of a tensor: the dense kernel is cheaper.
        if matches!(
            n.kind,
            Kind::BatchNorm { .. }
                | Kind::Relu
                | Kind::Sigmoid
                | Kind::HardSigmoid
                | Kind::Lut
                | Kind::MaxPool
        ) && self.dirty[u].len() * 3 > e.cur[u].len()
        {
            return self.dense_pristine(m, i, e);
        }
        if n.kind == Kind::Concat
            && n.inputs.iter().map(|&u| self.dirty[u].len()).sum::<usize>() * 3 > n.out_len()
        {
            return self.dense_pristine(m, i, e);
        }
        self.cand.clear();
        match n.kind {
            Kind::BatchNorm { .. } | Kind::Relu | Kind::Sigmoid | Kind::HardSigmoid | Kind::Lut => {
                let (before, after) = e.cur.split_at_mut(v);
                let (x, out) = (&before[u], &mut after[0]);
                for &k in &self.dirty[u] {
                    let k = k as usize;
                    match (n.kind, p) {
                        (
                            Kind::BatchNorm { .. },
                            Params::Bn {
                                gamma,
                                beta,
                                mean,
                                denom,
                            },
                        ) => {
                            let c = dhw.divmod(k).0;
                            out.f32_mut()[k] =
                                fp32::bn(x.f32()[k], mean[c], denom[c], gamma[c], beta[c]);
                        }
                        (Kind::Relu, _) => out.f32_mut()[k] = fp32::relu(x.f32()[k]),
                        (Kind::Sigmoid, _) => out.f32_mut()[k] = fp32::sigmoid(x.f32()[k]),
                        (Kind::HardSigmoid, _) => out.f32_mut()[k] = fp32::hardsigmoid(x.f32()[k]),
                        (Kind::Lut, Params::Lut(t)) => {
                            out.i8_mut()[k] = t[(x.i8()[k] as i32 + 128) as usize];
                        }
                        _ => {}
                    }
                }
                self.cand.extend_from_slice(&self.dirty[u]);
            }
            Kind::MaxPool => {
                let s = self.next_stamp();
                let (before, after) = e.cur.split_at_mut(v);
                for &k in &self.dirty[u] {
                    let k = k as usize;
                    let (c, r) = dhw.divmod(k);
                    let (y, x) = dw.divmod(r);
                    let (py, px) = (y / 2, x / 2);
                    if py < oh && px < ow {
                        let oe = (c * oh + py) * ow + px;
                        if self.marks[oe] != s {
                            self.marks[oe] = s;
                            maxpool_at(n, &before[u], &mut after[0], oe);
                            self.cand.push(oe as u32);
                        }
                    }
                }
            }
            Kind::Concat => {
                let (before, after) = e.cur.split_at_mut(v);
                let mut off = 0;
                for (k, &uk) in n.inputs.iter().enumerate() {
                    for &el in &self.dirty[uk] {
                        concat_at(
                            n,
                            k,
                            &before[uk],
                            el as usize,
                            &mut after[0],
                            off + el as usize,
                        );
                        self.cand.push((off + el as usize) as u32);
                    }
                    off += before[uk].len();
                }
            }
            Kind::Conv { k, pad } => {
                let nd = self.dirty[u].len();
                if m.precision == Precision::Int8 {
                    // Per output channel: the row delta costs k²·w vectorised MACs per
                    // dirty (channel, row), the channel-last scatter k² per dirty element
                    // and tap (vectorised over output channels, but with more overhead).
                    let nrows = self.mark_rows(u, ci, h, w);
                    if nd * SCATTER_DIV > nrows * w {
                        return self.conv_i8_rows(m, i, e, nrows);
                    }
                    self.stats.nodes_partial += 1;
                    let Params::ConvI8 { rq, .. } = p else {
                        return;
                    };
                    let wt_t = &m.pristine_wt[i];
                    let co8 = co.div_ceil(8) * 8;
                    let s = self.next_stamp();
                    // All zero between uses: every entry touched below is reset.
                    let delta = &mut self.delta;
                    if delta.len() < co8 * ohw {
                        delta.resize(co8 * ohw, 0);
                    }
                    let (xc, xg) = (e.cur[u].i8(), e.gold[u].i8());
                    self.pix.clear();
                    let dl = &self.dirty[u];
                    let mut idx = 0;
                    while idx < dl.len() {
                        // The list is sorted: walk it row by row, one division per row.
                        let r = dl[idx] as usize / w;
                        let (c, y) = (r / h, r % h);
                        let end = ((r + 1) * w) as u32;
                        let cnt = dl[idx..].partition_point(|&el| el < end);
                        for &el in &dl[idx..idx + cnt] {
                            let el = el as usize;
                            let x = el - r * w;
                            let d = xc[el] as i16 - xg[el] as i16;
                            for ky in 0..k {
                                // Output row oy reads input row oy + ky - pad = y.
                                let oy = (y + pad).wrapping_sub(ky);
                                if oy >= h {
                                    continue;
                                }
                                for kx in 0..k {
                                    let ox = (x + pad).wrapping_sub(kx);
                                    if ox >= w {
                                        continue;
                                    }
                                    let q = oy * w + ox;
                                    if self.marks[q] != s {
                                        self.marks[q] = s;
                                        self.pix.push(q as u32);
                                    }
                                    let wrow = &wt_t[((c * k + ky) * k + kx) * co8..][..co8];
                                    let arow = &mut delta[q * co8..][..co8];
                                    for (a8, w8) in
                                        arow.chunks_exact_mut(8).zip(wrow.chunks_exact(8))
                                    {
                                        for (a, &wv) in a8.iter_mut().zip(w8) {
                                            *a = a.wrapping_add(wv.wrapping_mul(d) as i32);
                                        }
                                    }
                                }
                            }
                        }
                        idx += cnt;
                    }
                    // Pixels ascending, channel-major candidates: the dirty list stays sorted.
                    self.pix.sort_unstable();
                    let gacc = &e.gold_acc[i];
                    let out = e.cur[v].i8_mut();
                    for (o, r) in rq.iter().enumerate() {
                        for &q in &self.pix {
                            let (q, kk) = (q as usize, o * ohw + q as usize);
                            let a = &mut delta[q * co8 + o];
                            out[kk] =
                                r.to_i8(gacc[kk].wrapping_add(*a), n.zp_out, n.act_min, n.act_max);
                            *a = 0;
                            self.cand.push(kk as u32);
                        }
                    }
                } else {
                    if nd * 16 > hw {
                        return self.conv_f32_rows(m, i, e);
                    }
                    let s = self.next_stamp();
                    self.pix.clear();
                    for &el in &self.dirty[u] {
                        let el = el as usize;
                        let (y, x) = dw.divmod(dhw.divmod(el).1);
                        for ky in 0..k {
                            let oy = (y + pad).wrapping_sub(ky);
                            if oy >= h {
                                continue;
                            }
                            for kx in 0..k {
                                let ox = (x + pad).wrapping_sub(kx);
                                if ox < w && self.marks[oy * w + ox] != s {
                                    self.marks[oy * w + ox] = s;
                                    self.pix.push((oy * w + ox) as u32);
                                }
                            }
                        }
                    }
                    // A gathered element costs ci·k² scalar MACs, a dense one ~1/8 of that.
                    if self.pix.len() * 16 > hw {
                        return self.conv_f32_rows(m, i, e);
                    }
                    self.stats.nodes_partial += 1;
                    let Params::ConvF32 { w: wt, b } = p else {
                        return;
                    };
                    let g = fp32::ConvGeom {
                        cin: ci,
                        cout: co,
                        h,
                        w,
                        k,
                        pad,
                    };
                    let (before, after) = e.cur.split_at_mut(v);
                    let (x, out) = (before[u].f32(), after[0].f32_mut());
                    for o in 0..co {
                        for &q in &self.pix {
                            let q = q as usize;
                            let (y, xx) = dw.divmod(q);
                            out[o * ohw + q] = fp32::conv_at(g, x, wt, b, o, y, xx);
                            self.cand.push((o * ohw + q) as u32);
                        }
                    }
                }
            }
            Kind::ConvT => {
                let nd = self.dirty[u].len();
                if m.precision == Precision::Int8 {
                    if nd * 8 > ci * hw {
                        return self.dense_pristine(m, i, e);
                    }
                    self.stats.nodes_partial += 1;
                    let Params::ConvI8 { w: wt, rq, .. } = p else {
                        return;
                    };
                    let acc = &mut e.cur_acc[i];
                    let (xc, xg) = (e.cur[u].i8(), e.gold[u].i8());
                    let s = self.next_stamp();
                    self.pix.clear();
                    for &el in &self.dirty[u] {
                        let el = el as usize;
                        let (c, r) = dhw.divmod(el);
                        let (y, x) = dw.divmod(r);
                        let d = xc[el] as i32 - xg[el] as i32;
                        for di in 0..2 {
                            for dj in 0..2 {
                                let q = (2 * y + di) * ow + 2 * x + dj;
                                if self.marks[q] != s {
                                    self.marks[q] = s;
                                    self.pix.push(q as u32);
                                }
                                for o in 0..co {
                                    let a = &mut acc[o * ohw + q];
                                    *a = a.wrapping_add(
                                        wt[(c * co + o) * 4 + di * 2 + dj] as i32 * d,
                                    );
                                }
                            }
                        }
                    }
                    self.requant_pixels(n, rq, i, v, e);
                } else {
                    if nd * 4 > hw {
                        return self.dense_pristine(m, i, e);
                    }
                    let s = self.next_stamp();
                    self.pix.clear();
                    for &el in &self.dirty[u] {
                        let q = dhw.divmod(el as usize).1;
                        if self.marks[q] != s {
                            self.marks[q] = s;
                            self.pix.push(q as u32);
                        }
                    }
                    if self.pix.len() * 4 > hw {
                        return self.dense_pristine(m, i, e);
                    }
                    self.stats.nodes_partial += 1;
                    let Params::ConvF32 { w: wt, b } = p else {
                        return;
                    };
                    let (before, after) = e.cur.split_at_mut(v);
                    let (x, out) = (before[u].f32(), after[0].f32_mut());
                    for o in 0..co {
                        for &q in &self.pix {
                            let (y, xx) = dw.divmod(q as usize);
                            for di in 0..2 {
                                for dj in 0..2 {
                                    let oe = o * ohw + (2 * y + di) * ow + 2 * xx + dj;
                                    out[oe] = fp32::convt_at(
                                        ci,
                                        co,
                                        h,
                                        w,
                                        x,
                                        wt,
                                        b,
                                        o,
                                        2 * y + di,
                                        2 * xx + dj,
                                    );
                                    self.cand.push(oe as u32);
                                }
                            }
                        }
                    }
                }
            }
        }
        if !matches!(n.kind, Kind::Conv { .. } | Kind::ConvT) {
            self.stats.nodes_partial += 1;
        }
        self.settle(v, e);
    }

    /// Marks the dirty (channel, row) pairs of value `u` (`[ci,h,w]`) in `self.rows`
    /// and returns how many there are.
    fn mark_rows(&mut self, u: usize, ci: usize, h: usize, w: usize) -> usize {
        self.rows.clear();
        self.rows.resize(ci * h, false);
        let mut n = 0;
        let d = &self.dirty[u];
        let mut k = 0;
        while k < d.len() {
            // One division per dirty row; the list is sorted, so skip to the next row.
            let r = d[k] as usize / w;
            self.rows[r] = true;
            n += 1;
            let end = ((r + 1) * w) as u32;
            k += d[k..].partition_point(|&el| el < end);
        }
        n
    }

    /// int8 conv with dirty inputs: adds `w·(new − old)` over the dirty (channel, row)
    /// pairs marked by `mark_rows` to the golden accumulators, requantises the output
    /// rows they reach. Exact: the accumulation wraps, so order does not matter.
    fn conv_i8_rows(&mut self, m: &Model, i: usize, e: &mut Entry, nrows: usize) {
        let n = &m.nodes[i];
        let v = i + 1;
        let u = n.inputs[0];
        let Kind::Conv { k, pad } = n.kind else {
            return;
        };
        let [co, _, _] = n.out;
        let [ci, h, w] = n.in_shapes[0];
        let p = &m.pristine_params[i];
        // The delta costs per dirty (channel, row) what dense costs per row, plus the
        // delta build and list upkeep.
        if nrows * 100 >= ci * h * ROWS_PCT {
            return self.dense_pristine(m, i, e);
        }
        let Params::ConvI8 { w: wt, rq, .. } = p else {
            return;
        };
        self.stats.nodes_partial += 1;
        let (hw, ph, pw) = (h * w, h + 2 * pad, w + 2 * pad);
        // Dirty channels, compacted.
        self.chans.clear();
        for c in 0..ci {
            if self.rows[c * h..(c + 1) * h].iter().any(|&r| r) {
                self.chans.push(c);
            }
        }
        let nc = self.chans.len();
        let dp = &mut self.scratch.pad_i;
        dp.clear();
        dp.resize(nc * ph * pw, 0);
        let (xc, xg) = (e.cur[u].i8(), e.gold[u].i8());
        for (j, &c) in self.chans.iter().enumerate() {
            for y in 0..h {
                if !self.rows[c * h + y] {
                    continue;
                }
                let (src_c, src_g) = (&xc[c * hw + y * w..][..w], &xg[c * hw + y * w..][..w]);
                let dst = &mut dp[(j * ph + y + pad) * pw + pad..][..w];
                for ((d, &a), &b) in dst.iter_mut().zip(src_c).zip(src_g) {
                    *d = a as i16 - b as i16;
                }
            }
        }
        // Output rows reached: y_out = y_in + pad - ky.
        self.orows.clear();
        self.orows.resize(h, false);
        for &c in &self.chans {
            for y in 0..h {
                if self.rows[c * h + y] {
                    for ky in 0..k {
                        let oy = (y + pad).wrapping_sub(ky);
                        if oy < h {
                            self.orows[oy] = true;
                        }
                    }
                }
            }
        }
        let acc = &mut e.cur_acc[i];
        for o in 0..co {
            let a = &mut acc[o * hw..][..hw];
            for (j, &c) in self.chans.iter().enumerate() {
                let plane = &dp[j * ph * pw..][..ph * pw];
                let wo = &wt[(o * ci + c) * k * k..][..k * k];
                for ky in 0..k {
                    for y in 0..h {
                        let iy = (y + ky).wrapping_sub(pad);
                        if iy >= h || !self.rows[c * h + iy] {
                            continue;
                        }
                        let src = &plane[(y + ky) * pw..][..w + k - 1];
                        let dst = &mut a[y * w..][..w];
                        if k == 3 {
                            let (w0, w1, w2) = (wo[ky * 3], wo[ky * 3 + 1], wo[ky * 3 + 2]);
                            for (x, d) in dst.iter_mut().enumerate() {
                                let s = w0.wrapping_mul(src[x]) as i32
                                    + w1.wrapping_mul(src[x + 1]) as i32
                                    + w2.wrapping_mul(src[x + 2]) as i32;
                                *d = d.wrapping_add(s);
                            }
                        } else {
                            for kx in 0..k {
                                let wv = wo[ky * k + kx];
                                for (x, d) in dst.iter_mut().enumerate() {
                                    *d = d.wrapping_add(wv.wrapping_mul(src[x + kx]) as i32);
                                }
                            }
                        }
                    }
                }
            }
        }
        let gacc = &e.gold_acc[i];
        let out = e.cur[v].i8_mut();
        for (o, r) in rq.iter().enumerate() {
            for y in (0..h).filter(|&y| self.orows[y]) {
                let range = o * hw + y * w..o * hw + (y + 1) * w;
                // Only accumulators that moved can change the output (branch-free
                // compaction: which ones moved is unpredictable).
                let start = self.cand.len();
                self.cand.resize(start + w + 1, 0);
                let mut nc = start;
                for kk in range.clone() {
                    self.cand[nc] = kk as u32;
                    nc += usize::from(acc[kk] != gacc[kk]);
                }
                self.cand.truncate(nc);
                for &kk in &self.cand[start..] {
                    let kk = kk as usize;
                    out[kk] = r.to_i8(acc[kk], n.zp_out, n.act_min, n.act_max);
                }
                acc[range.clone()].copy_from_slice(&gacc[range]);
            }
        }
        self.settle(v, e);
    }

    /// fp32 conv with dirty inputs: recomputes the output rows they reach, restarting
    /// each sum at the last golden checkpoint before the first dirty input channel.
    fn conv_f32_rows(&mut self, m: &Model, i: usize, e: &mut Entry) {
        let n = &m.nodes[i];
        let v = i + 1;
        let u = n.inputs[0];
        let Kind::Conv { k, pad } = n.kind else {
            return;
        };
        let [co, _, _] = n.out;
        let [ci, h, w] = n.in_shapes[0];
        let hw = h * w;
        let p = &m.pristine_params[i];
        let cmin = self.dirty[u].first().map_or(0, |&el| el as usize / hw);
        self.mark_rows(u, ci, h, w);
        self.orows.clear();
        self.orows.resize(h, false);
        for (r, _) in self.rows.iter().enumerate().filter(|(_, d)| **d) {
            let y = r % h;
            for ky in 0..k {
                let oy = (y + pad).wrapping_sub(ky);
                if oy < h {
                    self.orows[oy] = true;
                }
            }
        }
        let ck = n.ckpts.iter().rposition(|&c| c <= cmin);
        let all_rows = self.orows.iter().all(|&r| r);
        if ck.is_none() && all_rows {
            return self.dense_pristine(m, i, e);
        }
        let Params::ConvF32 { w: wt, b } = p else {
            return;
        };
        self.stats.nodes_partial += 1;
        let c_from = ck.map_or(0, |j| n.ckpts[j]);
        fp32::pad_input(e.cur[u].f32(), ci, h, w, pad, &mut self.scratch.pad_f);
        let g = fp32::ConvGeom {
            cin: ci,
            cout: co,
            h,
            w,
            k,
            pad,
        };
        let out = e.cur[v].f32_mut();
        for (o, &bias) in b.iter().enumerate().take(co) {
            for y in (0..h).filter(|&y| self.orows[y]) {
                let range = o * hw + y * w..o * hw + (y + 1) * w;
                let row = &mut out[range.clone()];
                match ck {
                    Some(j) => row.copy_from_slice(&e.gold_prefix[i][j][range.clone()]),
                    None => row.fill(bias),
                }
                fp32::conv_row(g, &self.scratch.pad_f, wt, o, c_from, y, row);
                self.cand.extend(range.start as u32..range.end as u32);
            }
        }
        self.settle(v, e);
    }

    /// Dense recomputation of node `i` with pristine parameters. For int8 convs only the
    /// accumulators that moved are requantised (the others give golden outputs, which
    /// the working copy already holds).
    fn dense_pristine(&mut self, m: &Model, i: usize, e: &mut Entry) {
        let n = &m.nodes[i];
        let (Precision::Int8, Params::ConvI8 { w: wt, b, rq }) =
            (m.precision, &m.pristine_params[i])
        else {
            return self.dense(m, i, &m.pristine_params[i], e);
        };
        self.stats.nodes_dense += 1;
        let v = i + 1;
        let [co, oh, ow] = n.out;
        let ohw = oh * ow;
        let [ci, h, w] = n.in_shapes[0];
        let x = e.cur[n.inputs[0]].i8();
        let acc = &mut self.scratch.acc;
        acc.resize(co * ohw, 0);
        match n.kind {
            Kind::Conv { k, pad } => {
                super::int8::pad_input(x, n.zp_in[0], ci, h, w, pad, &mut self.scratch.pad_i);
                let g = super::int8::ConvGeom {
                    cin: ci,
                    cout: co,
                    h,
                    w,
                    k,
                    pad,
                };
                super::int8::conv_acc(g, &self.scratch.pad_i, wt, b, 0..co, acc);
            }
            _ => {
                super::int8::pad_input(x, n.zp_in[0], ci, h, w, 0, &mut self.scratch.pad_i);
                super::int8::convt_acc(ci, co, h, w, &self.scratch.pad_i, wt, b, 0..co, acc);
            }
        }
        let gacc = &e.gold_acc[i];
        let moved: usize = acc.iter().zip(gacc).map(|(a, g)| usize::from(a != g)).sum();
        if moved * 2 > acc.len() {
            // Most moved: requantise everything, as the dense path does.
            let out = e.cur[v].i8_mut();
            for (o, r) in rq.iter().enumerate() {
                let range = o * ohw..(o + 1) * ohw;
                super::int8::requant_plane(
                    &acc[range.clone()],
                    *r,
                    n.zp_out,
                    n.act_min,
                    n.act_max,
                    &mut out[range],
                );
            }
            return self.compare_all(v, e);
        }
        let out = e.cur[v].i8_mut();
        self.cand.clear();
        self.cand.resize(co * ohw + 1, 0);
        let mut nc = 0;
        for (o, r) in rq.iter().enumerate() {
            let start = nc;
            let (a, g) = (&acc[o * ohw..][..ohw], &gacc[o * ohw..][..ohw]);
            for (q, (x, y)) in a.iter().zip(g).enumerate() {
                self.cand[nc] = (o * ohw + q) as u32;
                nc += usize::from(x != y);
            }
            for &kk in &self.cand[start..nc] {
                out[kk as usize] = r.to_i8(acc[kk as usize], n.zp_out, n.act_min, n.act_max);
            }
        }
        self.cand.truncate(nc);
        self.settle(v, e);
    }

    /// Requantises the accumulators of every channel at the pixels in `self.pix`,
    /// restores them to golden and lists the candidates.
    fn requant_pixels(&mut self, n: &RNode, rq: &[Requant], i: usize, v: usize, e: &mut Entry) {
        let ohw = n.out[1] * n.out[2];
        let acc = &mut e.cur_acc[i];
        let gacc = &e.gold_acc[i];
        let out = e.cur[v].i8_mut();
        for (o, r) in rq.iter().enumerate() {
            for &q in &self.pix {
                let k = o * ohw + q as usize;
                out[k] = r.to_i8(acc[k], n.zp_out, n.act_min, n.act_max);
                acc[k] = gacc[k];
                self.cand.push(k as u32);
            }
        }
    }
}

/// Division by a fixed divisor below 2^16 of numbers below 2^32, exact, without the
/// ~25-cycle integer `div` (the dirty-element loops decode a CHW index per element).
#[derive(Clone, Copy)]
struct FastDiv {
    d: usize,
    inv: f64,
}

impl FastDiv {
    fn new(d: usize) -> FastDiv {
        FastDiv {
            d: d.max(1),
            inv: 1.0 / d.max(1) as f64,
        }
    }
    /// `(n / d, n % d)`. `(n + 0.5) / d` stays at least `0.5 / d >= 2^-17` away from an
    /// integer while the f64 error is below `2^32 · 2^-52`, so the floor is exact.
    #[inline(always)]
    fn divmod(self, n: usize) -> (usize, usize) {
        debug_assert!(self.d > 0);
        if self.d >= 1 << 16 || n >= 1 << 32 {
            return (n / self.d, n % self.d);
        }
        let q = ((n as f64 + 0.5) * self.inv) as usize;
        (q, n - q * self.d)
    }
}

fn too_many(ch: &NodeChange) -> bool {
    ch.elems.iter().map(|(_, e)| e.len()).sum::<usize>() > MAX_SPARSE_PARAM_ELEMS
}

fn placeholder() -> Entry {
    Entry {
        hash: 0,
        input: Vec::new(),
        gold: Vec::new(),
        cur: Vec::new(),
        gold_acc: Vec::new(),
        cur_acc: Vec::new(),
        gold_prefix: Vec::new(),
        out_bytes: Vec::new(),
        last_used: 0,
        bytes: 0,
    }
}

/// Per node: the parameters that differ from pristine, decoded.
fn diff(m: &Model, params: &[u8]) -> Vec<Option<NodeChange>> {
    let mut out: Vec<Option<NodeChange>> = (0..m.nodes.len()).map(|_| None).collect();
    for (t, ti) in m.manifest.tensors.iter().enumerate() {
        let r = ti.offset..ti.offset + ti.nbytes;
        let (a, b) = (&params[r.clone()], &m.pristine[r]);
        if a == b || m.tensor_users[t].is_empty() {
            continue;
        }
        let sz = ti.dtype.size();
        let els: Vec<usize> = a
            .chunks_exact(sz)
            .zip(b.chunks_exact(sz))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(k, _)| k)
            .collect();
        for &node in &m.tensor_users[t] {
            let slot = out[node].get_or_insert_with(|| NodeChange {
                params: m.decode(node, params),
                elems: Vec::new(),
            });
            slot.elems.push((t, els.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::FastDiv;

    #[test]
    fn fast_div_is_exact() {
        for d in [
            1usize, 2, 3, 7, 8, 64, 96, 128, 192, 2048, 18432, 65535, 65536, 100_000,
        ] {
            let f = FastDiv::new(d);
            let check = |n: usize| assert_eq!(f.divmod(n), (n / d, n % d), "{n} / {d}");
            (0..200_000).for_each(check);
            for q in [1usize, 17, 1000, 65_535, 4_000_000] {
                for n in [q * d, q * d + d - 1, (q * d).saturating_sub(1)] {
                    if n < 1 << 32 {
                        check(n);
                    }
                }
            }
            check((1 << 32) - 1);
        }
    }
}
