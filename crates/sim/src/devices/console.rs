//! The PS UART1 console (115200 8N1) as a pseudo-terminal: boot log, login prompt, a
//! tiny shell, printk noise and kernel panic text.
//!
//! Output is paced at the line rate (11520 bytes/s). The emulator keeps the slave open
//! so the pty never hangs up; when nobody reads and the pty buffer fills, the oldest
//! bytes are discarded (a UART with nobody listening loses bytes; the newest, such as
//! a panic, are kept).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::pty::openpty;
use nix::sys::termios::{self, BaudRate, SetArg};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::board::lock;

pub const HOSTNAME: &str = "kria";
/// 115200 baud, 8N1: 10 bit times per byte.
const BYTES_PER_SEC: f64 = 11_520.0;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console pty: {what}: {errno}")]
    Pty {
        what: &'static str,
        errno: nix::Error,
    },
    #[error("console link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(Instant, String)>,
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    User,
    Password,
    Shell,
}

pub struct Console {
    master: Arc<OwnedFd>,
    /// Held open so the pty never hangs up; also used to drop stale output.
    slave: Arc<File>,
    slave_path: PathBuf,
    q: Mutex<Queue>,
    cv: Condvar,
    login: Mutex<(Login, String)>,
}

impl Console {
    /// Open a pty set up like the KV260 UART and link `link` to its slave.
    pub fn open(link: &Path) -> Result<Console, ConsoleError> {
        let pty = openpty(None, None).map_err(|errno| ConsoleError::Pty {
            what: "openpty",
            errno,
        })?;
        let mut t = termios::tcgetattr(pty.slave.as_fd()).map_err(|errno| ConsoleError::Pty {
            what: "tcgetattr",
            errno,
        })?;
        termios::cfmakeraw(&mut t);
        termios::cfsetspeed(&mut t, BaudRate::B115200).map_err(|errno| ConsoleError::Pty {
            what: "cfsetspeed",
            errno,
        })?;
        termios::tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &t).map_err(|errno| {
            ConsoleError::Pty {
                what: "tcsetattr",
                errno,
            }
        })?;
        fcntl(&pty.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|errno| {
            ConsoleError::Pty {
                what: "O_NONBLOCK",
                errno,
            }
        })?;
        fcntl(&pty.slave, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|errno| {
            ConsoleError::Pty {
                what: "O_NONBLOCK",
                errno,
            }
        })?;
        let slave_path = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
        ))
        .map_err(|source| ConsoleError::Link {
            path: link.to_path_buf(),
            source,
        })?;
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&slave_path, link).map_err(|source| ConsoleError::Link {
            path: link.to_path_buf(),
            source,
        })?;
        Ok(Console {
            master: Arc::new(pty.master),
            slave: Arc::new(File::from(pty.slave)),
            slave_path,
            q: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            login: Mutex::new((Login::User, String::new())),
        })
    }

    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    fn push(&self, due: Instant, text: String) {
        let mut q = lock(&self.q);
        let pos = q.items.partition_point(|(d, _)| *d <= due);
        q.items.insert(pos, (due, text));
        drop(q);
        self.cv.notify_all();
    }

    pub fn say(&self, text: impl Into<String>) {
        self.push(Instant::now(), text.into());
    }

    /// Drop everything not yet sent (power loss).
    pub fn clear(&self) {
        let mut q = lock(&self.q);
        q.items.clear();
        q.generation += 1;
        drop(q);
        *lock(&self.login) = (Login::User, String::new());
        self.cv.notify_all();
    }

    /// Schedule the boot log between `start` and `until` (login prompt comes at boot end).
    pub fn boot_log(&self, start: Instant, until: Instant) {
        let span = until.saturating_duration_since(start);
        for (frac, line) in BOOT_LOG {
            self.push(start + span.mul_f64(*frac), format!("{line}\r\n"));
        }
    }

    pub fn login_prompt(&self, _uptime: f64) {
        *lock(&self.login) = (Login::User, String::new());
        self.say(format!(
            "\r\nUbuntu 22.04.3 LTS {HOSTNAME} ttyPS1\r\n\r\n{HOSTNAME} login: "
        ));
    }

    pub fn noise(&self, r: &mut ChaCha8Rng, uptime: f64) {
        let line = NOISE[r.random_range(0..NOISE.len())];
        self.say(format!("[{uptime:12.6}] {line}\r\n"));
    }

    pub fn panic(&self, uptime: f64) {
        let mut s = String::new();
        for (i, line) in PANIC.iter().enumerate() {
            let t = uptime + i as f64 * 0.000_007;
            s.push_str(&format!("[{t:12.6}] {line}\r\n"));
        }
        self.say(s);
    }

    /// Keystrokes from the host: echo and a minimal getty/shell.
    fn input(&self, bytes: &[u8], up: bool) {
        if !up {
            return;
        }
        let mut out = String::new();
        let mut l = lock(&self.login);
        for &b in bytes {
            match b {
                b'\r' | b'\n' => {
                    let line = std::mem::take(&mut l.1);
                    out.push_str("\r\n");
                    match l.0 {
                        Login::User if line.trim().is_empty() => {
                            out.push_str(&format!("{HOSTNAME} login: "))
                        }
                        Login::User => {
                            l.0 = Login::Password;
                            out.push_str("Password: ");
                        }
                        Login::Password => {
                            l.0 = Login::Shell;
                            out.push_str("Welcome to Ubuntu 22.04.3 LTS (GNU/Linux 5.15.0-1027-xilinx-zynqmp aarch64)\r\n\r\n");
                            out.push_str(PROMPT);
                        }
                        Login::Shell => {
                            match line.trim() {
                                "" => {}
                                "exit" | "logout" => {
                                    l.0 = Login::User;
                                    out.push_str(&format!("\r\nUbuntu 22.04.3 LTS {HOSTNAME} ttyPS1\r\n\r\n{HOSTNAME} login: "));
                                    continue;
                                }
                                "uname -a" => out.push_str(
                                    "Linux kria 5.15.0-1027-xilinx-zynqmp #31-Ubuntu SMP PREEMPT Thu Jun 1 10:01:58 UTC 2023 aarch64 aarch64 aarch64 GNU/Linux\r\n",
                                ),
                                cmd => {
                                    let word = cmd.split_whitespace().next().unwrap_or("");
                                    out.push_str(&format!("-bash: {word}: command not found\r\n"));
                                }
                            }
                            out.push_str(PROMPT);
                        }
                    }
                }
                0x7f | 0x08 if l.1.pop().is_some() && l.0 != Login::Password => {
                    out.push_str("\x08 \x08")
                }
                0x7f | 0x08 => {}
                b if b.is_ascii() && !b.is_ascii_control() => {
                    l.1.push(b as char);
                    if l.0 != Login::Password {
                        out.push(b as char);
                    }
                }
                _ => {}
            }
        }
        drop(l);
        if !out.is_empty() {
            self.say(out);
        }
    }

    /// Writer: sends due items at the UART's pace.
    pub fn write_loop(&self, stopping: &dyn Fn() -> bool) {
        let mut master = File::from(self.master.try_clone().expect("dup of the pty master"));
        let mut slave = &*self.slave;
        while !stopping() {
            let mut q = lock(&self.q);
            let now = Instant::now();
            let next = match q.items.front() {
                Some((due, _)) if *due <= now => {
                    q.items.pop_front().map(|(_, t)| (t, q.generation))
                }
                Some((due, _)) => {
                    let wait = (*due - now).min(Duration::from_millis(250));
                    let _ = self.cv.wait_timeout(q, wait);
                    continue;
                }
                None => {
                    let _ = self.cv.wait_timeout(q, Duration::from_millis(250));
                    continue;
                }
            };
            drop(q);
            let Some((text, generation)) = next else {
                continue;
            };
            for chunk in text.as_bytes().chunks(64) {
                if lock(&self.q).generation != generation {
                    break; // power lost mid-line
                }
                let mut rest = chunk;
                let mut tries = 0;
                while !rest.is_empty() && tries < 8 {
                    match master.write(rest) {
                        Ok(n) => rest = &rest[n..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // Nobody is reading: drop the oldest buffered bytes.
                            let mut junk = [0u8; 4096];
                            let _ = slave.read(&mut junk);
                            tries += 1;
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_secs_f64(chunk.len() as f64 / BYTES_PER_SEC));
            }
        }
    }

    /// Reader: keystrokes from whoever holds the slave.
    pub fn read_loop(&self, stopping: &dyn Fn() -> bool, up: &dyn Fn() -> bool) {
        let mut master = File::from(self.master.try_clone().expect("dup of the pty master"));
        let mut buf = [0u8; 256];
        while !stopping() {
            let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(250u16)) {
                Ok(n) if n > 0 => match master.read(&mut buf) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(100)),
                    Ok(n) => self.input(&buf[..n], up()),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                },
                _ => {}
            }
        }
    }
}

const PROMPT: &str = "ubuntu@kria:~$ ";

/// Boot log: (fraction of the boot time, line). Standard ZynqMP/Kria output, abridged.
const BOOT_LOG: &[(f64, &str)] = &[
    (0.00, "Xilinx Zynq MP First Stage Boot Loader"),
    (0.00, "Release 2022.2   Oct 13 2022  -  07:15:53"),
    (0.01, "MultiBootOffset: 0x1F0"),
    (0.01, "Reset Mode\t:\tSystem Reset"),
    (
        0.02,
        "Platform: Silicon (4.0), Running on A53-0 (64-bit) Processor, Device Name: XCZUUNKNEG",
    ),
    (0.03, "QSPI 32 bit Boot Mode"),
    (0.04, "FlashID=0x20 0xBB 0x20"),
    (
        0.06,
        "PMU-FW is not running, certain applications may not be supported.",
    ),
    (0.08, "PMU Firmware 2022.2\tOct 13 2022   07:15:53"),
    (0.09, "PMU_ROM Version: xpbr-v8.1.0-0"),
    (0.10, "NOTICE:  BL31: Non secure code at 0x8000000"),
    (
        0.10,
        "NOTICE:  BL31: v2.6(release):xlnx_rebase_v2.6_2022.1_update1-dirty",
    ),
    (0.11, "NOTICE:  BL31: Built : 07:15:25, Oct 13 2022"),
    (0.13, ""),
    (
        0.13,
        "U-Boot 2022.01-g91ad7924-dirty (Oct 13 2022 - 07:15:12 +0000), Build: jenkins-BUILDS-2022.2-som_qspi_generation-134",
    ),
    (0.14, ""),
    (0.14, "CPU:   ZynqMP"),
    (0.15, "Silicon: v3"),
    (0.15, "Chip:  xck26"),
    (0.16, "Model: ZynqMP SMK-K26 Rev1/B/A"),
    (0.17, "Board: Xilinx ZynqMP"),
    (0.18, "DRAM:  2 GiB (effective 4 GiB)"),
    (0.20, "PMUFW:\tv1.1"),
    (0.21, "Xilinx I2C FRU format at nvmem0:"),
    (0.22, " Manufacturer Name: XILINX"),
    (0.22, " Product Name: SMK-K26-XCL2G"),
    (0.23, "Xilinx I2C FRU format at nvmem1:"),
    (0.23, " Product Name: SCK-KV-G"),
    (0.25, "Hit any key to stop autoboot:  0"),
    (0.28, "Scanning mmc 1:1..."),
    (0.31, "Starting kernel ..."),
    (
        0.35,
        "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x410fd034]",
    ),
    (
        0.35,
        "[    0.000000] Linux version 5.15.0-1027-xilinx-zynqmp (buildd@bos02-arm64-050) (gcc (Ubuntu 11.3.0-1ubuntu1~22.04.1) 11.3.0) #31-Ubuntu SMP PREEMPT",
    ),
    (0.36, "[    0.000000] Machine model: ZynqMP KV260 revB"),
    (
        0.37,
        "[    0.000000] earlycon: cdns0 at MMIO 0x00000000ff010000 (options '115200n8')",
    ),
    (
        0.38,
        "[    0.000000] Reserved memory: created DMA memory pool at 0x0000000060000000, size 160 MiB",
    ),
    (
        0.40,
        "[    0.000000] Kernel command line: earlycon console=ttyPS1,115200 console=tty1 clk_ignore_unused uio_pdrv_genirq.of_id=generic-uio",
    ),
    (
        0.45,
        "[    1.182350] zynqmp_firmware_probe Platform Management API v1.1",
    ),
    (
        0.50,
        "[    2.318872] i2c i2c-1: Added multiplexed i2c bus 2",
    ),
    (
        0.52,
        "[    2.402113] da9121 1-0033: Device detected (device-ID: 0x05, var-ID: 0x20, DA9131)",
    ),
    (
        0.53,
        "[    2.412480] da9121 1-0032: Device detected (device-ID: 0x05, var-ID: 0x20, DA9130)",
    ),
    (
        0.55,
        "[    2.640257] ina2xx-adc 1-0040: power monitor ina260 (Rshunt = 2000 uOhm)",
    ),
    (
        0.58,
        "[    3.109836] xilinx-ams ffa50000.ams: IIO: registered",
    ),
    (
        0.62,
        "[    4.020551] EXT4-fs (mmcblk1p2): mounted filesystem with ordered data mode. Opts: (null). Quota mode: none.",
    ),
    (
        0.66,
        "[    5.337402] systemd[1]: systemd 249.11-0ubuntu3.9 running in system mode",
    ),
    (
        0.68,
        "[    5.402786] systemd[1]: Detected architecture arm64.",
    ),
    (0.72, "[    5.881734] systemd[1]: Hostname set to <kria>."),
    (
        0.80,
        "[    8.120318] fpga_manager fpga0: writing kv260-hil.bit.bin to Xilinx ZynqMP FPGA Manager",
    ),
    (
        0.86,
        "[    9.402113] OF: overlay: WARNING: memory leak will occur if overlay removed, property: /fpga-full/firmware-name",
    ),
    (
        0.90,
        "[   10.733810] macb ff0e0000.ethernet eth0: Link is Up - 1Gbps/Full - flow control tx",
    ),
    (
        0.95,
        "[   12.508842] cloud-init[1201]: Cloud-init v. 23.1.2 finished. Up 12.41 seconds",
    ),
];

const NOISE: &[&str] = &[
    "systemd-journald[412]: Data hash table of /run/log/journal/3c1c/system.journal has a fill level at 75.0 (2731 of 3640 items), suggesting rotation.",
    "usb 1-1.2: USB disconnect, device number 3",
    "macb ff0e0000.ethernet eth0: Link is Up - 1Gbps/Full - flow control tx",
    "audit: type=1400 audit(1701770000.120:52): apparmor=\"STATUS\" operation=\"profile_replace\" name=\"snap-update-ns.xlnx-config\"",
    "cma: cma_alloc: reserved: alloc failed, req-size: 256 pages, ret: -12",
    "zynqmp-pinctrl firmware:zynqmp-firmware:pinctrl: pin 36 already requested by ff010000.serial",
];

const PANIC: &[&str] = &[
    "SError Interrupt on CPU1, code 0x00000000bf000000 -- SError",
    "CPU: 1 PID: 0 Comm: swapper/1 Not tainted 5.15.0-1027-xilinx-zynqmp #31-Ubuntu",
    "Hardware name: ZynqMP KV260 revB (DT)",
    "pstate: 60000085 (nZCv daIf -PAN -UAO -TCO -DIT -SSBS BTYPE=--)",
    "pc : cpuidle_enter_state+0xc8/0x3a0",
    "lr : cpuidle_enter_state+0xb4/0x3a0",
    "Kernel panic - not syncing: Asynchronous SError Interrupt",
    "SMP: stopping secondary CPUs",
    "Kernel Offset: disabled",
    "CPU features: 0x00000001,00000846",
    "Memory Limit: none",
    "---[ end Kernel panic - not syncing: Asynchronous SError Interrupt ]---",
];
