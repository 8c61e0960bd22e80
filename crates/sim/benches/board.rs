//! Emulated-board timing: how close wall-clock latency through the registers comes to
//! the modelled latency, how late a start after a pause is picked up, and what an idle
//! board costs in CPU. Run: `cargo bench -p sim --bench board`. Prints ratios measured in
//! the same run, no absolute targets (the machine is shared).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sim::memory::MemFile;

const REGS: u64 = 0xA000_0000;

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit(") ").next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv260-sim"))
        .arg("--board")
        .arg(repo.join("board-images/boards/kv260-sim.yaml"))
        .arg("--state-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let mem = MemFile::open(
        Path::new(info["mem"].as_str().unwrap()),
        info["file_base"].as_u64().unwrap(),
    )
    .unwrap();
    // Up once the bus answers (bound before the login prompt).
    while std::os::unix::net::UnixStream::connect(info["i2c"][0].as_str().unwrap()).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id();
    let hz = 100.0; // USER_HZ
    std::thread::sleep(Duration::from_secs(2));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(10));
    let idle_pct =
        cpu_ticks(pid).saturating_sub(c0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    println!("idle board CPU: {idle_pct:.2} % of one core");

    let run = |id: u64, params: u64| -> (Duration, u64) {
        mem.store32(REGS + 0x10, 0x6800_0000).unwrap();
        mem.store32(REGS + 0x1C, 0x6900_0000).unwrap();
        mem.store32(REGS + 0x28, params as u32).unwrap();
        mem.store32(REGS + 0x34, id as u32).unwrap();
        let c = mem.load32(REGS).unwrap();
        let t = Instant::now();
        mem.store32(REGS, (c & 0x80) | 1).unwrap();
        loop {
            let v = mem.load32(REGS).unwrap();
            if v & 1 == 0 && v & 2 != 0 {
                break;
            }
            std::hint::spin_loop();
        }
        let wall = t.elapsed();
        let cycles = mem.load32(REGS + 0x48).unwrap() as u64
            | (mem.load32(REGS + 0x4C).unwrap() as u64) << 32;
        (wall, cycles)
    };
    for name in ["tiny-relu-int8", "tiny-sigmoid-int8", "tiny-relu-fp32"] {
        let m = info["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap();
        let (id, params) = (
            m["id"].as_u64().unwrap(),
            m["params_addr"].as_u64().unwrap(),
        );
        // The first runs of a model build the datapath's golden caches: not timed.
        let (_, cycles) = run(id, params);
        run(id, params);
        let mut walls: Vec<Duration> = (0..200).map(|_| run(id, params).0).collect();
        walls.sort();
        // A start after a pause is seen by the idle poller.
        std::thread::sleep(Duration::from_secs(1));
        let (cold, _) = run(id, params);
        let modelled = Duration::from_secs_f64(cycles as f64 / 300e6);
        let p50 = walls[walls.len() / 2];
        let p99 = walls[walls.len() * 99 / 100];
        println!(
            "{name}: modelled {:.0} us ({cycles} cycles); back-to-back wall p50 {:.0} us (x{:.2}), p99 {:.0} us (x{:.2}); first after 1 s idle {:.0} us (x{:.2})",
            modelled.as_secs_f64() * 1e6,
            p50.as_secs_f64() * 1e6,
            p50.as_secs_f64() / modelled.as_secs_f64(),
            p99.as_secs_f64() * 1e6,
            p99.as_secs_f64() / modelled.as_secs_f64(),
            cold.as_secs_f64() * 1e6,
            cold.as_secs_f64() / modelled.as_secs_f64(),
        );
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}
