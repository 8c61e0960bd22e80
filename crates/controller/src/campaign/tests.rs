use super::*;
use crate::testutil::write_manifest;

fn models() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    // l0: 32 weights (N = 1024 at 32 bits -> 615), l1: 100k weights (-> 1536/1537).
    write_manifest(
        d.path(),
        "m-fp32",
        "f32",
        &[("l0", 32, 0), ("l1", 100_000, 8)],
    );
    write_manifest(
        d.path(),
        "m-int8",
        "i8",
        &[("l0", 32, 0), ("l1", 100_000, 8)],
    );
    d
}

const BASE: &str = "\
name: t1
models: [m-fp32]
inputs: [0, 1]
fault:
  kind: bit_flip
  targets:
    tensor_kinds: [weight]
strata: [model, layer]
seed: 7
";

#[test]
fn sizes_per_stratum_follow_leveugle() {
    let d = models();
    let c = compile("c.yaml", BASE, d.path()).unwrap();
    let planned: Vec<(String, u64, u64)> = c
        .strata
        .iter()
        .map(|s| (s.key.clone(), s.population, s.planned))
        .collect();
    assert_eq!(
        planned,
        vec![
            ("model=m-fp32,layer=l0".into(), 1024, 615),
            ("model=m-fp32,layer=l1".into(), 3_200_000, 1536), // 1537 only as N -> infinity
        ]
    );
    assert_eq!(c.injections.len(), 615 + 1536);
    // ids are dense and every fault is distinct within a stratum
    for (i, inj) in c.injections.iter().enumerate() {
        assert_eq!(inj.trial_id, i as u64);
    }
    let l0: HashSet<_> = c
        .injections
        .iter()
        .filter(|i| i.stratum == 0)
        .map(|i| format!("{:?}", i.faults))
        .collect();
    assert_eq!(l0.len(), 615);
}

#[test]
fn same_file_and_seed_give_the_same_list() {
    let d = models();
    let a = compile("c.yaml", BASE, d.path()).unwrap();
    let b = compile("c.yaml", BASE, d.path()).unwrap();
    assert_eq!(a, b);
    let other = compile("c.yaml", &BASE.replace("seed: 7", "seed: 8"), d.path()).unwrap();
    assert_ne!(a.hash, other.hash);
    assert_ne!(a.injections, other.injections);
}

#[test]
fn bit_and_voltage_strata() {
    let d = models();
    let y = "\
name: t2
models: [m-int8]
inputs: [0]
fault: {kind: stuck_at_1, targets: {layers: [l0]}}
strata: [model, bit, voltage]
voltages: {vccint: [850, 600]}
sizing: {method: fixed, count: 10}
seed: 1
";
    let c = compile("c.yaml", y, d.path()).unwrap();
    assert_eq!(c.strata.len(), 16);
    assert!(
        c.strata
            .iter()
            .all(|s| s.population == 32 && s.planned == 10)
    );
    assert_eq!(c.strata[0].key, "model=m-int8,bit=00,vccint=850mV");
    assert_eq!(c.injections.len(), 160);
    for i in &c.injections {
        let s = &c.strata[i.stratum as usize];
        assert_eq!(Some(i.bit), s.bit);
        assert_eq!(i.faults[0].bits, vec![i.bit]);
        assert_eq!(i.voltages, s.voltages);
    }
}

fn err(y: &str) -> String {
    let d = models();
    compile("c.yaml", y, d.path()).unwrap_err().to_string()
}

#[test]
fn malformed_yaml_is_a_located_error() {
    let e = err("name: [unclosed\nmodels: x\n");
    assert!(e.starts_with("c.yaml: "), "{e}");
}

#[test]
fn unknown_fields_are_named_with_their_line() {
    let e = err(&BASE.replace("seed: 7", "seed: 7\nsead: 8"));
    assert!(e.contains("sead") && e.contains("line 10"), "{e}");
    let e = err(&BASE.replace("kind: bit_flip", "kind: bit_flip\n  bitz: 2"));
    assert!(e.contains("bitz"), "{e}");
}

#[test]
fn impossible_strata_are_refused() {
    let e = err(&BASE.replace("strata: [model, layer]", "strata: [model, voltage]"));
    assert!(
        e.contains("line 8") && e.contains("impossible strata"),
        "{e}"
    );
    let e = err(&BASE.replace("tensor_kinds: [weight]", "layers: [nope]"));
    assert!(e.contains("line 7") && e.contains("\"nope\""), "{e}");
    let e = err(&format!("{BASE}sizing: {{method: fixed, count: 2000}}\n"));
    assert!(
        e.contains("impossible strata") && e.contains("only 1024"),
        "{e}"
    );
    let e = err(&BASE.replace("tensor_kinds: [weight]", "tensor_kinds: [bn_gamma]"));
    assert!(e.contains("impossible strata"), "{e}");
}

#[test]
fn semantic_errors_name_field_and_line() {
    let e = err(&BASE.replace("models: [m-fp32]", "models: [m-fp32, m-fp32]"));
    assert!(e.contains("line 2: models") && e.contains("twice"), "{e}");
    let e = err(&BASE.replace("models: [m-fp32]", "models: [missing]"));
    assert!(e.contains("missing"), "{e}");
    let e = err(&format!("{BASE}sizing: {{margin: 1.5}}\n"));
    assert!(e.contains("line 10: sizing.margin"), "{e}");
    let e = err(&format!("{BASE}schedule: \"99 * * * *\"\n"));
    assert!(e.contains("line 10: schedule"), "{e}");
    let e = err(&format!("{BASE}time_limit: soon\n"));
    assert!(e.contains("time_limit"), "{e}");
    let e = err(&BASE.replace("inputs: [0, 1]", "inputs: []"));
    assert!(e.contains("line 3: inputs"), "{e}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("90m"), Ok(5400));
    assert_eq!(parse_duration("2h"), Ok(7200));
    assert_eq!(parse_duration("15"), Ok(15));
    assert!(parse_duration("x").is_err());
}
