//! Whole-process tests: start `kv260-sim` and drive it only through its Linux-like
//! interfaces: the memory file mapped MAP_SHARED (as /dev/mem), SMBus frames on the I2C
//! socket, hwmon files, the console pty and the power socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::manifest::DType;
use proto::smbus::{Request, Response, Status, transact};
use serde_json::Value;
use sim::memory::MemFile;

const REGS: u64 = 0xA000_0000;
const INPUT: u64 = 0x6800_0000;
const OUTPUT: u64 = 0x6900_0000;
const CTRL: u64 = REGS;
const ARG_INPUT: u64 = REGS + 0x10;
const ARG_OUTPUT: u64 = REGS + 0x1C;
const ARG_PARAMS: u64 = REGS + 0x28;
const ARG_MODEL: u64 = REGS + 0x34;
const REG_ERROR: u64 = REGS + 0x3C;
const REG_ID: u64 = REGS + 0x40;
const REG_CYCLES: u64 = REGS + 0x48;
const VCCINT: u8 = 0x32;
const VOUT: u8 = 0x25;

/// Generous bound for "never": a hang must not be done after this long.
const HANG_WAIT: Duration = Duration::from_secs(3);
/// Bound for waits that should succeed; only reached when something is broken.
const LONG: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    repo().join("board-images/models").canonicalize().unwrap()
}

/// kv260-sim.yaml with its `sim:` section replaced: test timings, plus `overrides`.
fn board_yaml(overrides: &[(&str, &str)]) -> String {
    let text = std::fs::read_to_string(repo().join("board-images/boards/kv260-sim.yaml")).unwrap();
    let head = &text[..text
        .find("\nsim:\n")
        .expect("kv260-sim.yaml has a sim section")];
    let models = models_dir().display().to_string();
    let mut kv: Vec<(&str, &str)> = vec![
        ("models_dir", &models),
        ("boot_ms", "300"),
        ("min_off_ms", "400"),
        ("printk_interval_s", "0"),
    ];
    for (k, v) in overrides {
        match kv.iter_mut().find(|(key, _)| key == k) {
            Some(e) => e.1 = v,
            None => kv.push((k, v)),
        }
    }
    let body: String = kv.iter().map(|(k, v)| format!("  {k}: {v}\n")).collect();
    format!("{head}\nsim:\n{body}")
}

struct Board {
    child: Child,
    info: Value,
    _dir: tempfile::TempDir,
    mem: MemFile,
    console: Arc<Mutex<String>>,
}

impl Board {
    fn start(seed: u64, overrides: &[(&str, &str)]) -> Board {
        let dir = tempfile::tempdir().unwrap();
        let board = dir.path().join("board.yaml");
        std::fs::write(&board, board_yaml(overrides)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kv260-sim"))
            .arg("--board")
            .arg(&board)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--seed")
            .arg(seed.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("info line {line:?}: {e}"));
        let mem = MemFile::open(
            Path::new(info["mem"].as_str().unwrap()),
            info["file_base"].as_u64().unwrap(),
        )
        .unwrap();
        // Read the console all the time, as a lab host's serial logger does.
        let console = Arc::new(Mutex::new(String::new()));
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(info["console"].as_str().unwrap())
            .unwrap();
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                match tty.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        let b = Board {
            child,
            info,
            _dir: dir,
            mem,
            console,
        };
        b.wait_console("login: ", 0);
        b
    }

    /// Wait until `pat` appears in the console output after byte `from`; returns its end.
    fn wait_console(&self, pat: &str, from: usize) -> usize {
        let t0 = Instant::now();
        loop {
            {
                let c = self.console.lock().unwrap();
                if let Some(i) = c.get(from..).and_then(|s| s.find(pat)) {
                    return from + i + pat.len();
                }
            }
            assert!(
                t0.elapsed() < LONG,
                "console never showed {pat:?}; got:\n{}",
                self.console.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn console_len(&self) -> usize {
        self.console.lock().unwrap().len()
    }

    fn physics(&self, k: &str) -> f64 {
        self.info["physics"][k].as_f64().unwrap()
    }

    fn model(&self, name: &str) -> (u32, u64) {
        let m = self.info["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap();
        (
            m["id"].as_u64().unwrap() as u32,
            m["params_addr"].as_u64().unwrap(),
        )
    }

    fn i2c(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(self.info["i2c"][0].as_str().unwrap())
    }

    fn smbus(&self, req: &Request) -> Response {
        transact(&mut self.i2c().unwrap(), req).unwrap()
    }

    fn set_vccint(&self, code: u8) {
        let r = self.smbus(&Request::write_byte_data(VCCINT, VOUT, code));
        assert_eq!(r.status, Status::Ok);
    }

    fn power(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(self.info["power"].as_str().unwrap()).unwrap();
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn hwmon(&self, dev: &str, file: &str) -> i64 {
        let root = Path::new(self.info["hwmon"].as_str().unwrap());
        for e in std::fs::read_dir(root).unwrap() {
            let d = e.unwrap().path();
            if std::fs::read_to_string(d.join("name")).unwrap().trim() == dev {
                return std::fs::read_to_string(d.join(file))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
            }
        }
        panic!("no hwmon device named {dev}");
    }

    fn hwmon_mean(&self, dev: &str, file: &str, n: usize) -> f64 {
        let mut s = 0.0;
        for _ in 0..n {
            s += self.hwmon(dev, file) as f64;
            std::thread::sleep(Duration::from_millis(12));
        }
        s / n as f64
    }

    fn set_args(&self, id: u32, params: u64, input: u64, output: u64) {
        let m = &self.mem;
        m.store32(ARG_INPUT, input as u32).unwrap();
        m.store32(ARG_INPUT + 4, (input >> 32) as u32).unwrap();
        m.store32(ARG_OUTPUT, output as u32).unwrap();
        m.store32(ARG_OUTPUT + 4, (output >> 32) as u32).unwrap();
        m.store32(ARG_PARAMS, params as u32).unwrap();
        m.store32(ARG_PARAMS + 4, (params >> 32) as u32).unwrap();
        m.store32(ARG_MODEL, id).unwrap();
    }

    /// ap_start, then wait for ap_done (start cleared, done set). `None`: still not
    /// done after `wait`.
    fn start_and_wait(&self, wait: Duration) -> Option<()> {
        let c = self.mem.load32(CTRL).unwrap();
        self.mem.store32(CTRL, (c & 0x80) | 1).unwrap();
        let t0 = Instant::now();
        loop {
            let c = self.mem.load32(CTRL).unwrap();
            if c & 1 == 0 && c & 2 != 0 {
                return Some(());
            }
            if t0.elapsed() > wait {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// One inference through the registers; `None` if it hung.
    fn infer(&self, name: &str, input: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let (id, params) = self.model(name);
        let out_len = output_bytes(name);
        self.mem.write(INPUT, input).unwrap();
        self.mem.write(OUTPUT, &vec![0x5A; out_len]).unwrap();
        self.set_args(id, params, INPUT, OUTPUT);
        self.start_and_wait(wait)?;
        Some(self.mem.read_vec(OUTPUT, out_len).unwrap())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn manifest(name: &str) -> proto::manifest::Manifest {
    proto::manifest::Manifest::load(&models_dir().join(format!("{name}.json"))).unwrap()
}

fn output_bytes(name: &str) -> usize {
    manifest(name).output.nbytes()
}

fn refs(name: &str, tensor: &str) -> (Vec<usize>, Vec<u8>) {
    let path = models_dir().join(format!("refs/{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(tensor).unwrap();
    (v.shape().to_vec(), v.data().to_vec())
}

/// Input image `i` of the tiny test set as the model's input bytes.
fn input_bytes(name: &str, i: usize) -> Vec<u8> {
    let m = manifest(name);
    let ts = proto::model_files::TestSet::load_size(&models_dir(), "tiny").unwrap();
    match m.input.dtype {
        DType::I8 => proto::model_files::quantize_input(ts.input(i), m.input.quant.unwrap())
            .iter()
            .map(|&q| q as u8)
            .collect(),
        _ => ts.input(i).iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn ref_logits(name: &str, i: usize) -> Vec<u8> {
    let (shape, data) = refs(name, "logits");
    let per = data.len() / shape[0];
    data[i * per..(i + 1) * per].to_vec()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const INT8: &str = "tiny-relu-int8";
const FP32: &str = "tiny-relu-fp32";

#[test]
fn golden_inference_via_registers_matches_reference() {
    let b = Board::start(11, &[]);
    assert_eq!(b.mem.load32(REG_ID).unwrap(), 0x4B56_3236);
    assert_eq!(b.mem.load32(CTRL).unwrap() & 0x4, 0x4, "idle after boot");
    for i in 0..2 {
        let out = b.infer(INT8, &input_bytes(INT8, i), LONG).unwrap();
        assert_eq!(
            out,
            ref_logits(INT8, i),
            "int8 image {i}: not bit-identical to refs/"
        );
    }
    // Quantised inputs agree with the shipped ones, so the comparison above is fair.
    let (_, q) = refs(INT8, "inputs_q");
    assert_eq!(&q[..input_bytes(INT8, 0).len()], &input_bytes(INT8, 0)[..]);
    assert_eq!(b.mem.load32(REG_ERROR).unwrap(), 0);
    let cycles = b.mem.load32(REG_CYCLES).unwrap() as u64
        | (b.mem.load32(REG_CYCLES + 4).unwrap() as u64) << 32;
    // Plausible for a DPU-class engine at 300 MHz on a tiny U-Net: 10 us .. 10 ms.
    assert!(
        (3_000..3_000_000).contains(&cycles),
        "cycle counter {cycles}"
    );

    let out = b.infer(FP32, &input_bytes(FP32, 0), LONG).unwrap();
    let want = f32s(&ref_logits(FP32, 0));
    for (k, (a, w)) in f32s(&out).iter().zip(&want).enumerate() {
        assert!(
            (a - w).abs() <= 1e-4 * w.abs().max(1.0),
            "fp32 logit {k}: {a} vs {w}"
        );
    }
}

#[test]
fn flipped_parameter_bit_changes_output_as_datapath_predicts() {
    use sim::datapath::{Engine, Model};
    let model = Arc::new(Model::load(&models_dir(), INT8).unwrap());
    let engine = Engine::new(model.clone());
    let input = input_bytes(INT8, 0);
    let golden = engine.run_full(model.pristine(), &input, &[]).unwrap();
    // A sign-bit flip in a weight that visibly changes the output.
    let w = model
        .manifest()
        .tensors
        .iter()
        .find(|t| t.kind == proto::manifest::TensorKind::Weight)
        .unwrap()
        .clone();
    let (mut params, mut predicted, mut flipped_at) = (Vec::new(), Vec::new(), 0);
    for e in 0..w.nbytes {
        let mut p = model.pristine().to_vec();
        p[w.offset + e] ^= 0x80;
        let out = engine.run_full(&p, &input, &[]).unwrap();
        if out != golden {
            (params, predicted, flipped_at) = (p, out, w.offset + e);
            break;
        }
    }
    assert!(
        !predicted.is_empty(),
        "no sign flip in {} changes the output",
        w.name
    );

    let b = Board::start(12, &[]);
    let (_, addr) = b.model(INT8);
    assert_eq!(
        b.mem.read_vec(addr, params.len()).unwrap(),
        model.pristine(),
        "DDR holds the pristine blob"
    );
    // Poke the one byte, as the agent's injector does.
    b.mem
        .write(addr + flipped_at as u64, &[params[flipped_at]])
        .unwrap();
    let out = b.infer(INT8, &input, LONG).unwrap();
    assert_eq!(
        out, predicted,
        "board output differs from the datapath's prediction"
    );
    assert_ne!(out, golden);
    b.mem
        .write(addr + flipped_at as u64, &[model.pristine()[flipped_at]])
        .unwrap();
    assert_eq!(
        b.infer(INT8, &input, LONG).unwrap(),
        golden,
        "restored parameters give golden again"
    );
}

#[test]
fn undervolting_faults_then_hang_then_crash_and_power_cycle_recovers() {
    let mut b = Board::start(13, &[]);
    let (vmin, vhang, vcrash) = (
        b.physics("vmin_mv"),
        b.physics("vhang_mv"),
        b.physics("vcrash_mv"),
    );
    let input = input_bytes(INT8, 0);
    let golden = ref_logits(INT8, 0);
    assert_eq!(
        b.smbus(&Request::read_byte_data(VCCINT, VOUT)).byte(),
        Some(85)
    );
    assert_eq!(
        b.smbus(&Request::read_byte_data(VCCINT, 0x48)).byte(),
        Some(0x05)
    );

    let mut code = 85u8;
    // Guardband: not a single fault.
    while f64::from(code) * 10.0 >= vmin {
        b.set_vccint(code);
        assert_eq!(
            b.smbus(&Request::read_byte_data(VCCINT, VOUT)).byte(),
            Some(code)
        );
        for _ in 0..3 {
            assert_eq!(
                b.infer(INT8, &input, LONG).unwrap(),
                golden,
                "fault at {code}0 mV, above Vmin {vmin}"
            );
        }
        code -= 1;
    }
    // Below Vmin and above Vhang: faults appear.
    let mut faulty = 0;
    let mut runs = 0;
    while f64::from(code) * 10.0 >= vhang {
        b.set_vccint(code);
        let pg = b
            .smbus(&Request::read_byte_data(VCCINT, 0x02))
            .byte()
            .unwrap();
        assert_eq!(pg & 0x08, 0x08, "PG1 at {code}0 mV");
        for _ in 0..15 {
            let out = b.infer(INT8, &input, LONG).expect("no hang above Vhang");
            runs += 1;
            faulty += usize::from(out != golden);
        }
        code -= 1;
    }
    assert!(
        faulty > 0,
        "no fault in {runs} runs between Vmin {vmin} and Vhang {vhang}"
    );
    // Hang window [Vcrash, Vhang): ap_done never comes.
    assert!(
        f64::from(code) * 10.0 >= vcrash,
        "no 10 mV step in the hang window"
    );
    b.set_vccint(code);
    assert!(
        b.infer(INT8, &input, HANG_WAIT).is_none(),
        "accelerator finished at {code}0 mV, below Vhang {vhang}"
    );
    assert_eq!(
        b.mem.load32(CTRL).unwrap() & 0x6,
        0,
        "hung: neither done nor idle"
    );
    // Below Vcrash: kernel panic, then nothing answers.
    let mark = b.console_len();
    let mut s = b.i2c().unwrap();
    let _ = transact(&mut s, &Request::write_byte_data(VCCINT, VOUT, code - 1));
    b.wait_console("Kernel panic - not syncing", mark);
    let t0 = Instant::now();
    while b.i2c().is_ok() {
        assert!(t0.elapsed() < LONG, "I2C still answers after the crash");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.alive(), "the emulator itself must survive a board crash");

    // Power cycle: a working board at nominal voltage.
    let mark = b.console_len();
    assert_eq!(b.power("cycle 600"), "ok on");
    b.wait_console("Starting kernel", mark);
    b.wait_console("login: ", mark);
    assert_eq!(
        b.smbus(&Request::read_byte_data(VCCINT, VOUT)).byte(),
        Some(85)
    );
    assert_eq!(b.infer(INT8, &input, LONG).unwrap(), golden);
}

#[test]
fn short_power_off_locks_the_sequencer_until_a_long_off() {
    let b = Board::start(14, &[("min_off_ms", "1500")]);
    let mark = b.console_len();
    assert_eq!(b.power("off"), "ok off");
    assert_eq!(b.power("on"), "ok on");
    assert_eq!(b.power("status"), "ok on");
    let t0 = Instant::now();
    while b.i2c().is_ok() {
        assert!(t0.elapsed() < LONG, "I2C still answers after the off");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Several boot times later: still nothing.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(b.i2c().is_err(), "locked board answers on I2C");
    assert!(
        !b.console.lock().unwrap()[mark..].contains("login:"),
        "locked board booted"
    );
    // A long off clears it.
    assert_eq!(b.power("cycle 1700"), "ok on");
    b.wait_console("login: ", mark);
    assert!(b.i2c().is_ok());
    assert_eq!(
        b.infer(INT8, &input_bytes(INT8, 0), LONG).unwrap(),
        ref_logits(INT8, 0)
    );
}

#[test]
fn power_and_temperature_follow_load_voltage_and_ambient() {
    let b = Board::start(15, &[("thermal_tau_s", "0.5"), ("thermal_c_per_w", "8")]);
    std::thread::sleep(Duration::from_millis(1500)); // settle at idle
    let p_idle = b.hwmon_mean("ina260_u14", "power1_input", 40);
    let t_idle = b.hwmon_mean("ams", "temp3_input", 10);
    let i_idle = b.hwmon_mean("ina260_u14", "curr1_input", 20);
    let v_bus = b.hwmon("ina260_u14", "in1_input");
    assert!(
        (4800..=5100).contains(&v_bus),
        "INA260 bus voltage {v_bus} mV"
    );
    // Keep the accelerator busy: auto_restart.
    let (id, params) = b.model(FP32);
    b.mem.write(INPUT, &input_bytes(FP32, 0)).unwrap();
    b.set_args(id, params, INPUT, OUTPUT);
    b.mem.store32(CTRL, 0x81).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let p_busy = b.hwmon_mean("ina260_u14", "power1_input", 40);
    let t_busy = b.hwmon_mean("ams", "temp3_input", 10);
    let i_busy = b.hwmon_mean("ina260_u14", "curr1_input", 20);
    assert!(p_busy > p_idle, "busy {p_busy} uW <= idle {p_idle} uW");
    assert!(i_busy > i_idle, "busy {i_busy} mA <= idle {i_idle} mA");
    assert!(t_busy > t_idle, "busy {t_busy} m°C <= idle {t_idle} m°C");
    // Lower VCCINT (still in the guardband) under the same load: less power, AMS follows.
    b.set_vccint(65);
    let t0 = Instant::now();
    while (b.hwmon("ams", "in3_input") - 650).abs() > 6 {
        assert!(t0.elapsed() < LONG, "AMS in3 never showed 650 mV");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let p_low = b.hwmon_mean("ina260_u14", "power1_input", 40);
    let t_low = b.hwmon_mean("ams", "temp3_input", 10);
    assert!(
        p_low < p_busy,
        "at 650 mV {p_low} uW >= at 850 mV {p_busy} uW"
    );
    assert!(
        t_low < t_busy,
        "at 650 mV {t_low} m°C >= at 850 mV {t_busy} m°C"
    );
    // A hotter room: a hotter die.
    assert_eq!(b.power("ambient 60"), "ok ambient 60.0");
    std::thread::sleep(Duration::from_millis(2500));
    let t_hot = b.hwmon_mean("ams", "temp3_input", 10);
    assert!(
        t_hot > t_low + 20_000.0,
        "ambient +35 degC: {t_hot} vs {t_low} m°C"
    );
    b.mem.store32(CTRL, 0).unwrap(); // stop auto_restart
}

/// Faulty outputs of `n` runs at a voltage between Vhang and Vmin.
fn fault_sequence(seed: u64, n: usize) -> (Vec<Vec<u8>>, usize) {
    let b = Board::start(seed, &[]);
    let (vmin, vhang) = (b.physics("vmin_mv"), b.physics("vhang_mv"));
    let code = ((vhang + 0.35 * (vmin - vhang)) / 10.0).ceil() as u8;
    b.set_vccint(code);
    let input = input_bytes(INT8, 0);
    let golden = ref_logits(INT8, 0);
    let outs: Vec<Vec<u8>> = (0..n)
        .map(|_| b.infer(INT8, &input, LONG).unwrap())
        .collect();
    let faulty = outs.iter().filter(|o| **o != golden).count();
    (outs, faulty)
}

#[test]
fn same_seed_same_fault_sequence() {
    let (a, fa) = fault_sequence(21, 12);
    let (b, _) = fault_sequence(21, 12);
    assert!(
        fa > 0,
        "no faults at all: the comparison would prove nothing"
    );
    assert!(a == b, "same seed, different fault sequences");
    let (c, _) = fault_sequence(22, 12);
    assert!(a != c, "a different seed gave the very same faults");
}

#[test]
fn malformed_accesses_are_ignored_or_flagged_never_fatal() {
    let mut b = Board::start(16, &[]);
    let wait_until = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < LONG, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Read-only ID register and an offset with no register.
    b.mem.store32(REG_ID, 0xFFFF_FFFF).unwrap();
    b.mem.store32(REGS + 0x800, 0x1234_5678).unwrap();
    b.mem.write(CTRL + 1, &[0xFF]).unwrap(); // byte write into status bits
    wait_until("ID register restored", &|| {
        b.mem.load32(REG_ID).unwrap() == 0x4B56_3236
    });
    wait_until("unmapped offset reads 0", &|| {
        b.mem.load32(REGS + 0x800).unwrap() == 0
    });
    wait_until("status bits restored", &|| {
        b.mem.load32(CTRL).unwrap() & 0xFF7E == 0x0004
    });

    // Unknown model id: done with ERR_BAD_MODEL.
    let (_, params) = b.model(INT8);
    b.set_args(999, params, INPUT, OUTPUT);
    b.start_and_wait(LONG).unwrap();
    assert_eq!(b.mem.load32(REG_ERROR).unwrap() & 0x4, 0x4);
    // Input outside DDR: read decode error; output into the register window: write error.
    let (id, _) = b.model(INT8);
    b.set_args(id, params, 0x1000, REGS + 0x100);
    b.start_and_wait(LONG).unwrap();
    assert_eq!(b.mem.load32(REG_ERROR).unwrap() & 0x3, 0x3);
    assert_eq!(
        b.mem.load32(REG_ID).unwrap(),
        0x4B56_3236,
        "output not written over registers"
    );
    // Address overflow at the top of the 64-bit space.
    b.set_args(id, u64::MAX - 16, u64::MAX - 16, u64::MAX - 16);
    b.start_and_wait(LONG).unwrap();
    assert_ne!(b.mem.load32(REG_ERROR).unwrap(), 0);

    // Regulators: out-of-range codes clamp, read-only registers ignore writes.
    b.set_vccint(0xFF); // above VMAX: clamped to VMAX (950 mV), no crash
    let t0 = Instant::now();
    while b.hwmon("ams", "in3_input") < 940 {
        assert!(t0.elapsed() < LONG, "VMAX clamp not visible on AMS in3");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.hwmon("ams", "in3_input") <= 960);
    b.set_vccint(85);
    assert_eq!(
        b.smbus(&Request::write_byte_data(0x33, 0x25, 0x00)).status,
        Status::Ok
    ); // VCCBRAM code 0 -> 0.3 V
    assert_eq!(
        b.smbus(&Request::write_byte_data(0x33, 0x25, 0x55)).status,
        Status::Ok
    );
    b.smbus(&Request::write_byte_data(VCCINT, 0x48, 0x99));
    assert_eq!(
        b.smbus(&Request::read_byte_data(VCCINT, 0x48)).byte(),
        Some(0x05)
    );
    assert_eq!(
        b.smbus(&Request::read_byte_data(0x77, 0x00)).status,
        Status::AddrNack
    );
    assert_eq!(
        b.smbus(&Request::read_block_data(VCCINT, 0x25)).status,
        Status::DataNack
    );
    // PMBus: bad PEC is refused and changes nothing.
    let before = b
        .smbus(&Request::read_word_data(0x13, 0x21))
        .word()
        .unwrap();
    let mut req = Request::write_word_data(0x13, 0x21, 100).with_pec();
    let mut frame = req.encode().unwrap();
    *frame.last_mut().unwrap() ^= 0xFF;
    let mut s = b.i2c().unwrap();
    s.write_all(&frame).unwrap();
    req.pec = true;
    assert_eq!(
        Response::read_from(&mut s, &req).unwrap().status,
        Status::BadPec
    );
    assert_eq!(
        b.smbus(&Request::read_word_data(0x13, 0x21)).word(),
        Some(before)
    );
    let r = b.smbus(&Request::read_word_data(0x13, 0x8B).with_pec());
    assert_eq!(r.status, Status::Ok, "read with PEC");
    // A malformed frame: error status, connection closed, the bus still works.
    let mut s = b.i2c().unwrap();
    s.write_all(&[0x09, 0x32, 0x00, 0x00]).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got.first(), Some(&(Status::Malformed as u8)));
    assert_eq!(
        b.smbus(&Request::read_byte_data(VCCINT, VOUT)).byte(),
        Some(85)
    );
    // Power socket garbage.
    assert!(b.power("reboot now please").starts_with("err "));
    assert!(b.power("cycle -5").starts_with("err "));
    assert!(b.power("ambient 1e9").starts_with("err "));

    assert!(b.alive());
    assert_eq!(
        b.infer(INT8, &input_bytes(INT8, 0), LONG).unwrap(),
        ref_logits(INT8, 0)
    );
}

#[test]
fn real_and_emulated_board_files_agree() {
    use proto::board::BoardFile;
    let real = BoardFile::load(&repo().join("board-images/boards/kv260.yaml")).unwrap();
    let emu = BoardFile::load(&repo().join("board-images/boards/kv260-sim.yaml")).unwrap();
    assert_eq!(real.regions, emu.regions);
    assert_eq!(real.accelerator, emu.accelerator);
    assert!(real.sim.is_none() && emu.sim.is_some());
    for r in &real.rails {
        let e = emu
            .rail(&r.name)
            .unwrap_or_else(|| panic!("rail {} missing in kv260-sim.yaml", r.name));
        assert_eq!(
            (r.driver, r.address, r.register, r.nominal_mv),
            (e.driver, e.address, e.register, e.nominal_mv)
        );
    }
    assert_eq!(real.memory.device, Path::new("/dev/mem"));
    // The emulator refuses the real board's file rather than touching /dev/mem.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kv260-sim"))
        .arg("--board")
        .arg(repo().join("board-images/boards/kv260.yaml"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--models")
        .arg(models_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/dev/mem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn in_process_board_boots_and_obeys_the_power_switch() {
    use sim::board::Life;
    let dir = tempfile::tempdir().unwrap();
    let board = dir.path().join("board.yaml");
    std::fs::write(&board, board_yaml(&[])).unwrap();
    let cfg = sim::SimConfig {
        board_file: board,
        state_dir: dir.path().join("state"),
        seed: 5,
        models_dir: None,
    };
    let h = sim::Sim::start(cfg).unwrap();
    assert!(
        h.info()
            .models
            .iter()
            .any(|m| m.name == INT8 && m.error.is_none())
    );
    let t0 = Instant::now();
    while h.life() != Life::Up {
        assert!(t0.elapsed() < LONG, "never booted: {:?}", h.life());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.power_command("status"), "ok on");
    assert_eq!(h.power_command("off"), "ok off");
    assert_eq!(h.life(), Life::Off);
    // The bus thread closes its listener on the power event; wait for it.
    let t0 = Instant::now();
    while UnixStream::connect(&h.info().i2c[0]).is_ok() {
        assert!(t0.elapsed() < LONG, "I2C answers while off");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(h.power_command("dance").starts_with("err unknown command"));
    h.stop();
}

#[test]
fn pl_power_cycle_clears_a_hang_and_a_write_to_a_dead_pl_panics() {
    let b = Board::start(17, &[]);
    let (vhang, vcrash) = (b.physics("vhang_mv"), b.physics("vcrash_mv"));
    let input = input_bytes(INT8, 0);
    let code = (vcrash / 10.0).ceil() as u8;
    assert!(f64::from(code) * 10.0 < vhang);
    b.set_vccint(code);
    assert!(
        b.infer(INT8, &input, HANG_WAIT).is_none(),
        "no hang at {code}0 mV"
    );
    b.set_vccint(85);
    assert!(
        b.infer(INT8, &input, HANG_WAIT).is_none(),
        "a hang lasts until the PL is reset"
    );
    // xmutil pwrctl --off / --status / --on
    const SEQ: u8 = 0x68;
    assert_eq!(
        b.smbus(&Request::write_byte_data(SEQ, 0x08, 0x00)).status,
        Status::Ok
    );
    let mut s = b.i2c().unwrap();
    assert_eq!(
        transact(&mut s, &Request::send_byte(SEQ, 0xF5))
            .unwrap()
            .status,
        Status::Ok
    );
    assert_eq!(
        transact(&mut s, &Request::receive_byte(SEQ))
            .unwrap()
            .byte(),
        Some(0x04)
    );
    assert_eq!(
        b.smbus(&Request::write_byte_data(SEQ, 0x08, 0x3E)).status,
        Status::Ok
    );
    assert_eq!(
        b.smbus(&Request::read_byte_data(SEQ, 0xF5)).byte(),
        Some(0x9A)
    );
    let t0 = Instant::now();
    while b.mem.load32(REG_ID).unwrap() != 0x4B56_3236 || b.mem.load32(CTRL).unwrap() & 0x4 == 0 {
        assert!(t0.elapsed() < LONG, "accelerator not back after PL on");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.infer(INT8, &input, LONG).unwrap(), ref_logits(INT8, 0));
    // Touching the PL while it is off: SError, kernel panic.
    b.smbus(&Request::write_byte_data(SEQ, 0x08, 0x00));
    let t0 = Instant::now();
    while b.mem.load32(REG_ID).unwrap() != 0 {
        assert!(
            t0.elapsed() < LONG,
            "control block still there with the PL off"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mark = b.console_len();
    b.mem.store32(CTRL, 1).unwrap();
    b.wait_console("SError Interrupt", mark);
}
