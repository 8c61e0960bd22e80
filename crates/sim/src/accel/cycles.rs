//! Latency model of a DPU-class engine: what the cycle counter reports and how long the
//! emulator waits before raising ap_done, so latencies are plausible for a KV260.
//!
//! int8: a B4096-like array (PP x ICP x OCP = 8 x 16 x 16 MACs/cycle). A convolution
//! takes ceil(Cin/ICP) * ceil(Cout/OCP) * k*k * ceil(H*W/PP) cycles, so thin layers waste
//! most of the array, as on the real DPU. fp32: `fp32_macs_per_cycle` MACs/cycle at
//! best. Elementwise nodes stream at PP*OCP (int8) or 16 (fp32) elements/cycle. Every
//! node pays a fixed overhead (instruction fetch, pipeline fill), and all parameters,
//! the input, the output and every intermediate activation cross DDR at
//! `axi_bytes_per_cycle`.

use proto::board::SimSection;
use proto::manifest::{DType, Manifest, Op};

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

pub fn model_cycles(m: &Manifest, p: &SimSection) -> u64 {
    let int8 = m.input.dtype == DType::I8;
    let elem_bytes = if int8 { 1 } else { 4 };
    let icp = p.int8_icp.max(1);
    let ocp = p.int8_ocp.max(1);
    let pp = (p.int8_macs_per_cycle / (icp * ocp)).max(1);
    let channels = |name: &str| -> u64 {
        if name == "input" {
            m.input.shape.first().copied().unwrap_or(1) as u64
        } else {
            m.nodes
                .iter()
                .find(|n| n.name == name)
                .and_then(|n| n.out_shape.first())
                .copied()
                .unwrap_or(1) as u64
        }
    };
    let mut cycles = 0u64;
    let mut act_bytes = 0u64;
    for n in &m.nodes {
        let out_elems: u64 = n.out_shape.iter().product::<usize>() as u64;
        let cout = n.out_shape.first().copied().unwrap_or(1) as u64;
        let hw = out_elems / cout.max(1);
        let cin: u64 = n.inputs.first().map_or(1, |i| channels(i));
        let taps = match n.op {
            Op::Conv2d => {
                let k = n.attrs.kernel.unwrap_or(1) as u64;
                Some(k * k)
            }
            // Each output pixel of a 2x2 stride-2 transposed conv sees one tap.
            Op::Convtranspose2 => Some(1),
            _ => None,
        };
        let c = match taps {
            Some(t) if int8 => ceil_div(cin, icp) * ceil_div(cout, ocp) * t * ceil_div(hw, pp),
            Some(t) => ceil_div(cin * cout * t * hw, p.fp32_macs_per_cycle),
            None if int8 => ceil_div(out_elems, pp * ocp),
            None => ceil_div(out_elems, 16),
        };
        cycles += c + p.layer_overhead_cycles;
        act_bytes += 2 * out_elems * elem_bytes;
    }
    let io = m.params_bytes as u64 + m.input.nbytes() as u64 + m.output.nbytes() as u64 + act_bytes;
    cycles + ceil_div(io, p.axi_bytes_per_cycle)
}
