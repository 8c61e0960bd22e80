//! Fixtures shared by unit tests, integration tests and benchmarks.

use std::path::Path;

/// Writes `{name}.json`: a valid manifest with one conv layer per entry of `layers`
/// (`(layer, weight elements, bias elements)`), dtype `f32` or `i8`.
pub fn write_manifest(dir: &Path, name: &str, dtype: &str, layers: &[(&str, usize, usize)]) {
    let size = if dtype == "f32" { 4 } else { 1 };
    let mut tensors = Vec::new();
    let mut nodes = Vec::new();
    let mut offset = 0usize;
    let mut prev = "input".to_string();
    for (layer, w, b) in layers {
        let mut params = serde_json::Map::new();
        for (kind, n) in [("weight", *w), ("bias", *b)] {
            if n == 0 {
                continue;
            }
            let tname = format!("{layer}.{kind}");
            tensors.push(serde_json::json!({
                "name": tname, "layer": layer, "kind": kind, "dtype": dtype,
                "shape": [n], "offset": offset, "nbytes": n * size
            }));
            params.insert(kind.to_string(), tname.into());
            offset += (n * size).div_ceil(64) * 64;
        }
        nodes.push(serde_json::json!({
            "name": layer, "op": "conv2d", "inputs": [prev], "out_shape": [1, 1, 1],
            "params": params
        }));
        prev = layer.to_string();
    }
    let m = serde_json::json!({
        "format": proto::manifest::FORMAT, "name": name, "size": "tiny",
        "activation": "relu", "stage": if dtype == "f32" { "fp32" } else { "int8" },
        "num_classes": 6,
        "input": {"shape": [25, 32, 64], "dtype": dtype, "quant": null},
        "output": {"node": prev, "shape": [6, 32, 64], "dtype": dtype, "quant": null},
        "params_bytes": offset.max(64), "tensors": tensors, "nodes": nodes
    });
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&m).expect("json"),
    )
    .expect("write manifest");
}
