//! The devices on an emulated I2C bus: DA9130/DA9131 bucks (register-mapped, 8-bit),
//! a generic PMBus buck (LINEAR16 VOUT), and the carrier's INA260 (read-only view of
//! the power model). Register semantics follow the parts; see docs/sim.md for what is
//! clamped, ignored or refused.

use std::collections::BTreeMap;
use std::time::Instant;

use proto::board::{BoardFile, Rail, RailDriver};
use proto::smbus::{Op, Request, Response, Status};

/// Output of one regulator channel: a linear ramp from `from` to `to` starting at `t0`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    from_mv: f64,
    to_mv: f64,
    t0: Instant,
    slew_mv_per_us: f64,
}

impl Output {
    fn steady(mv: f64, slew: f64) -> Output {
        Output {
            from_mv: mv,
            to_mv: mv,
            t0: Instant::now(),
            slew_mv_per_us: slew,
        }
    }
    pub fn at(&self, now: Instant) -> f64 {
        let span = (self.to_mv - self.from_mv).abs();
        if span == 0.0 {
            return self.to_mv;
        }
        let done = now.saturating_duration_since(self.t0).as_secs_f64()
            * 1e6
            * self.slew_mv_per_us.max(1e-6);
        if done >= span {
            self.to_mv
        } else {
            self.from_mv + (self.to_mv - self.from_mv) * done / span
        }
    }
    pub fn target(&self) -> f64 {
        self.to_mv
    }
    fn set(&mut self, mv: f64, now: Instant) {
        if (mv - self.to_mv).abs() > f64::EPSILON {
            self.from_mv = self.at(now);
            self.to_mv = mv;
            self.t0 = now;
        }
    }
}

// ---------------------------------------------------------------------------------
// DA9130 / DA9131

pub const DA_SYS_STATUS_0: u8 = 0x01;
pub const DA_SYS_STATUS_1: u8 = 0x02;
pub const DA_SYS_EVENT_0: u8 = 0x04;
pub const DA_BUCK1_0: u8 = 0x20;
pub const DA_BUCK1_3: u8 = 0x23;
pub const DA_BUCK1_4: u8 = 0x24;
pub const DA_BUCK1_5: u8 = 0x25;
pub const DA_BUCK1_6: u8 = 0x26;
pub const DA_DEVICE_ID: u8 = 0x48;
/// Channel 2 registers sit 8 above channel 1's.
pub const DA_CH2: u8 = 0x08;

/// Code -> mV: 10 mV/LSB; codes below 0x1E read as 0.3 V and above 0xBE as 1.9 V
/// (the part's VOUT table saturates; UNVERIFIED against the data sheet, see docs).
pub fn da_code_mv(code: u8) -> f64 {
    f64::from(code.clamp(30, 190)) * 10.0
}

#[derive(Debug, Clone)]
pub struct Da913x {
    regs: [u8; 256],
    channels: [Option<Output>; 2],
    nominal: [Option<f64>; 2],
    slew: f64,
}

fn da_reg_exists(r: u8) -> bool {
    matches!(r, 0x01..=0x0E | 0x20..=0x26 | 0x28..=0x2E | 0x48..=0x4B)
}

impl Da913x {
    pub fn new(nominal: [Option<f64>; 2], slew: f64) -> Da913x {
        let mut d = Da913x {
            regs: [0; 256],
            channels: [None, None],
            nominal,
            slew,
        };
        d.reset();
        d
    }

    /// OTP defaults: what the part loads at power-on.
    pub fn reset(&mut self) {
        self.regs = [0; 256];
        self.regs[DA_DEVICE_ID as usize] = 0x05;
        self.regs[0x49] = 0x20; // VARIANT_ID (DA9130/1 OTP; value not read on hardware)
        self.regs[0x4A] = 0x00;
        self.regs[0x4B] = 0x00;
        for ch in 0..2 {
            let b = (ch as u8) * DA_CH2;
            match self.nominal[ch] {
                Some(mv) => {
                    let code = (mv / 10.0).round().clamp(30.0, 190.0) as u8;
                    self.regs[(DA_BUCK1_0 + b) as usize] = 0x01 | (0x3 << 1) | (0x3 << 4); // CH_EN, slew
                    self.regs[(DA_BUCK1_3 + b) as usize] = code.saturating_add(10); // VMAX: nominal + 100 mV
                    self.regs[(DA_BUCK1_4 + b) as usize] = 0x00; // VSEL A
                    self.regs[(DA_BUCK1_5 + b) as usize] = code;
                    self.regs[(DA_BUCK1_6 + b) as usize] = code;
                    self.channels[ch] = Some(Output::steady(f64::from(code) * 10.0, self.slew));
                }
                None => self.channels[ch] = None,
            }
        }
        self.update_status(Instant::now());
    }

    fn enabled(&self, ch: usize) -> bool {
        self.regs[(DA_BUCK1_0 + ch as u8 * DA_CH2) as usize] & 1 != 0
    }

    /// The output the registers ask for: selected VOUT (A or B), clamped by VMAX; 0 if off.
    fn requested_mv(&self, ch: usize) -> f64 {
        let b = ch as u8 * DA_CH2;
        if !self.enabled(ch) {
            return 0.0;
        }
        let vsel_b = self.regs[(DA_BUCK1_4 + b) as usize] & 0x10 != 0;
        let code = self.regs[(if vsel_b { DA_BUCK1_6 } else { DA_BUCK1_5 } + b) as usize];
        let vmax = da_code_mv(self.regs[(DA_BUCK1_3 + b) as usize]);
        da_code_mv(code).min(vmax)
    }

    pub fn output_mv(&self, ch: usize, now: Instant) -> Option<f64> {
        self.channels.get(ch)?.as_ref().map(|o| o.at(now))
    }

    pub fn target_mv(&self, ch: usize) -> Option<f64> {
        self.channels.get(ch)?.as_ref().map(|o| o.target())
    }

    pub fn is_enabled(&self, ch: usize) -> bool {
        self.channels.get(ch).is_some_and(|c| c.is_some()) && self.enabled(ch)
    }

    fn update_status(&mut self, now: Instant) {
        let mut s1 = 0u8;
        for ch in 0..2 {
            if let Some(o) = &self.channels[ch] {
                let (v, t) = (o.at(now), o.target());
                let mut bits = 0u8;
                if self.enabled(ch) {
                    if (v - t).abs() < 5.0 {
                        bits |= 0x08; // PG
                    }
                    if v < t * 0.95 {
                        bits |= 0x02; // UV
                    }
                    if v > t * 1.05 {
                        bits |= 0x04; // OV
                    }
                }
                s1 |= bits << (4 * ch);
            }
        }
        self.regs[DA_SYS_STATUS_1 as usize] = s1;
        self.regs[DA_SYS_STATUS_0 as usize] = 0;
    }

    fn read(&mut self, reg: u8, now: Instant) -> u8 {
        self.update_status(now);
        if da_reg_exists(reg) {
            self.regs[reg as usize]
        } else {
            0
        }
    }

    fn write(&mut self, reg: u8, v: u8, now: Instant) {
        match reg {
            // Status and OTP identification are read-only: writes are ignored.
            0x01..=0x03 | 0x48..=0x4B => {}
            // Events are write-1-to-clear.
            0x04..=0x06 => self.regs[reg as usize] &= !v,
            r if da_reg_exists(r) => self.regs[r as usize] = v,
            _ => {}
        }
        for ch in 0..2 {
            let req = self.requested_mv(ch);
            if let Some(o) = self.channels[ch].as_mut() {
                o.set(req, now);
            }
        }
    }

    fn transact(&mut self, req: &Request, now: Instant) -> Response {
        match req.op {
            Op::ReadByteData => Response::ok(vec![self.read(req.cmd, now)]),
            Op::WriteByteData => {
                self.write(req.cmd, req.data[0], now);
                Response::ok(vec![])
            }
            // Register-mapped part with auto-increment: a word is two consecutive registers.
            Op::ReadWordData => {
                let lo = self.read(req.cmd, now);
                Response::ok(vec![lo, self.read(req.cmd.wrapping_add(1), now)])
            }
            Op::WriteWordData => {
                self.write(req.cmd, req.data[0], now);
                self.write(req.cmd.wrapping_add(1), req.data[1], now);
                Response::ok(vec![])
            }
            // No SMBus block protocol, no receive/send byte on this part.
            _ => Response::err(Status::DataNack),
        }
    }
}

// ---------------------------------------------------------------------------------
// Generic PMBus buck

pub mod pmbus {
    pub const PAGE: u8 = 0x00;
    pub const OPERATION: u8 = 0x01;
    pub const CLEAR_FAULTS: u8 = 0x03;
    pub const VOUT_MODE: u8 = 0x20;
    pub const VOUT_COMMAND: u8 = 0x21;
    pub const VOUT_MAX: u8 = 0x24;
    pub const STATUS_BYTE: u8 = 0x78;
    pub const STATUS_WORD: u8 = 0x79;
    pub const STATUS_VOUT: u8 = 0x7A;
    pub const STATUS_CML: u8 = 0x7E;
    pub const READ_VOUT: u8 = 0x8B;
    pub const READ_IOUT: u8 = 0x8C;
    pub const READ_TEMPERATURE_1: u8 = 0x8D;
    pub const READ_POUT: u8 = 0x96;
    pub const MFR_ID: u8 = 0x99;
    /// VOUT_MODE: LINEAR, exponent -12 (V = mantissa / 4096).
    pub const VOUT_MODE_VALUE: u8 = 0x14;
    pub const CML_INVALID_COMMAND: u8 = 0x80;
    pub const CML_INVALID_DATA: u8 = 0x40;
    pub const CML_PEC: u8 = 0x20;
    pub const VOUT_MAX_WARNING: u8 = 0x08;
}

/// LINEAR11: value = Y * 2^N, Y 11-bit and N 5-bit two's complement.
pub fn linear11(value: f64) -> u16 {
    let mut n: i32 = -16;
    while n < 15 && (value / 2f64.powi(n)).abs() > 1023.0 {
        n += 1;
    }
    let y = (value / 2f64.powi(n)).round().clamp(-1024.0, 1023.0) as i32;
    (((n & 0x1F) as u16) << 11) | ((y & 0x7FF) as u16)
}

pub fn from_linear11(w: u16) -> f64 {
    let n = ((w >> 11) as i32 ^ 0x10) - 0x10;
    let y = ((w & 0x7FF) as i32 ^ 0x400) - 0x400;
    f64::from(y) * 2f64.powi(n)
}

#[derive(Debug, Clone)]
pub struct Pmbus {
    nominal_mv: f64,
    page: u8,
    operation: u8,
    vout_command: u16,
    vout_max: u16,
    status_vout: u8,
    status_cml: u8,
    out: Output,
    slew: f64,
}

fn mv_to_l16(mv: f64) -> u16 {
    (mv / 1000.0 * 4096.0).round().clamp(0.0, 65535.0) as u16
}

fn l16_to_mv(w: u16) -> f64 {
    f64::from(w) / 4096.0 * 1000.0
}

impl Pmbus {
    pub fn new(nominal_mv: f64, slew: f64) -> Pmbus {
        let mut p = Pmbus {
            nominal_mv,
            page: 0,
            operation: 0x80,
            vout_command: 0,
            vout_max: 0,
            status_vout: 0,
            status_cml: 0,
            out: Output::steady(nominal_mv, slew),
            slew,
        };
        p.reset();
        p
    }

    pub fn reset(&mut self) {
        self.page = 0;
        self.operation = 0x80;
        self.vout_command = mv_to_l16(self.nominal_mv);
        self.vout_max = mv_to_l16(self.nominal_mv * 1.15);
        self.status_vout = 0;
        self.status_cml = 0;
        self.out = Output::steady(l16_to_mv(self.vout_command), self.slew);
    }

    pub fn output_mv(&self, now: Instant) -> f64 {
        self.out.at(now)
    }

    fn apply(&mut self, now: Instant) {
        let on = self.operation & 0x80 != 0;
        let cmd = self.vout_command.min(self.vout_max);
        let mv = if on { l16_to_mv(cmd) } else { 0.0 };
        self.out.set(mv, now);
    }

    fn status_word(&self) -> u16 {
        let mut w = 0u16;
        if self.operation & 0x80 == 0 {
            w |= 0x40; // OFF
        }
        if self.status_cml != 0 {
            w |= 0x02; // CML
        }
        if self.status_vout != 0 {
            w |= 0x8000; // VOUT
        }
        w
    }

    fn refuse(&mut self, bit: u8) -> Response {
        self.status_cml |= bit;
        Response::err(Status::DataNack)
    }

    fn transact(&mut self, req: &Request, now: Instant, s: &SensorView) -> Response {
        use pmbus::*;
        let word = |w: u16| Response::ok(w.to_le_bytes().to_vec());
        // Only page 0 exists; anything but PAGE itself is refused while another page is selected.
        if self.page != 0 && req.cmd != PAGE {
            return self.refuse(CML_INVALID_DATA);
        }
        match (req.op, req.cmd) {
            (Op::ReadByteData, PAGE) => Response::ok(vec![self.page]),
            (Op::WriteByteData, PAGE) => {
                if req.data[0] == 0 || req.data[0] == 0xFF {
                    self.page = 0;
                    Response::ok(vec![])
                } else {
                    self.refuse(CML_INVALID_DATA)
                }
            }
            (Op::ReadByteData, OPERATION) => Response::ok(vec![self.operation]),
            (Op::WriteByteData, OPERATION) => {
                self.operation = req.data[0];
                self.apply(now);
                Response::ok(vec![])
            }
            (Op::SendByte, CLEAR_FAULTS) => {
                self.status_vout = 0;
                self.status_cml = 0;
                Response::ok(vec![])
            }
            (Op::ReadByteData, VOUT_MODE) => Response::ok(vec![VOUT_MODE_VALUE]),
            (Op::ReadWordData, VOUT_COMMAND) => word(self.vout_command),
            (Op::WriteWordData, VOUT_COMMAND) => {
                let w = u16::from_le_bytes([req.data[0], req.data[1]]);
                self.vout_command = w;
                if w > self.vout_max {
                    // PMBus: a command above VOUT_MAX is limited to VOUT_MAX and flagged.
                    self.status_vout |= VOUT_MAX_WARNING;
                }
                self.apply(now);
                Response::ok(vec![])
            }
            (Op::ReadWordData, VOUT_MAX) => word(self.vout_max),
            (Op::WriteWordData, VOUT_MAX) => {
                self.vout_max = u16::from_le_bytes([req.data[0], req.data[1]]);
                self.apply(now);
                Response::ok(vec![])
            }
            (Op::ReadByteData, STATUS_BYTE) => Response::ok(vec![self.status_word() as u8]),
            (Op::ReadWordData, STATUS_WORD) => word(self.status_word()),
            (Op::ReadByteData, STATUS_VOUT) => Response::ok(vec![self.status_vout]),
            (Op::ReadByteData, STATUS_CML) => Response::ok(vec![self.status_cml]),
            (Op::ReadWordData, READ_VOUT) => word(mv_to_l16(self.out.at(now))),
            (Op::ReadWordData, READ_IOUT) => {
                let on = self.out.at(now) > 1.0;
                word(linear11(if on { s.pmbus_iout_a } else { 0.0 }))
            }
            (Op::ReadWordData, READ_TEMPERATURE_1) => word(linear11(s.board_c)),
            (Op::ReadWordData, READ_POUT) => {
                word(linear11(self.out.at(now) / 1000.0 * s.pmbus_iout_a))
            }
            (Op::ReadBlockData, MFR_ID) => Response::ok(b"KV260SIM".to_vec()),
            // Known commands with the wrong transaction type, and unknown commands.
            _ => self.refuse(CML_INVALID_COMMAND),
        }
    }

    fn pec_failed(&mut self) {
        self.status_cml |= pmbus::CML_PEC;
    }
}

// ---------------------------------------------------------------------------------
// INA260 (read-only view of the power model)

#[derive(Debug, Clone)]
pub struct Ina260 {
    config: u16,
    mask: u16,
    alert: u16,
}

impl Ina260 {
    fn new() -> Ina260 {
        Ina260 {
            config: 0x6327,
            mask: 0,
            alert: 0,
        }
    }
    fn transact(&mut self, req: &Request, s: &SensorView) -> Response {
        // 16-bit registers, most significant byte first on the wire.
        let be = |w: u16| Response::ok(w.to_be_bytes().to_vec());
        match (req.op, req.cmd) {
            (Op::ReadWordData, 0x00) => be(self.config),
            (Op::ReadWordData, 0x01) => be(s.ina.current_raw as u16),
            (Op::ReadWordData, 0x02) => be(s.ina.voltage_raw),
            (Op::ReadWordData, 0x03) => be(s.ina.power_raw),
            (Op::ReadWordData, 0x06) => be(self.mask | 0x0008), // CVRF: conversion ready
            (Op::ReadWordData, 0x07) => be(self.alert),
            (Op::ReadWordData, 0xFE) => be(0x5449), // "TI"
            (Op::ReadWordData, 0xFF) => be(0x2270),
            (Op::WriteWordData, c) => {
                let w = u16::from_be_bytes([req.data[0], req.data[1]]);
                match c {
                    0x00 => self.config = if w & 0x8000 != 0 { 0x6327 } else { w },
                    0x06 => self.mask = w & 0xFC03,
                    0x07 => self.alert = w,
                    _ => {} // read-only registers ignore writes
                }
                Response::ok(vec![])
            }
            _ => Response::err(Status::DataNack),
        }
    }
}

// ---------------------------------------------------------------------------------
// The bus

/// Sensor values some devices report (from the power model, updated by the hwmon thread).
#[derive(Debug, Clone, Copy)]
pub struct SensorView {
    pub ina: crate::physics::power::Ina260Sample,
    pub board_c: f64,
    pub pmbus_iout_a: f64,
}

impl Default for SensorView {
    fn default() -> Self {
        SensorView {
            ina: crate::physics::power::Ina260Sample {
                current_raw: 0,
                voltage_raw: 4000,
                power_raw: 0,
            },
            board_c: 25.0,
            pmbus_iout_a: 0.4,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Device {
    Da913x(Box<Da913x>),
    Pmbus(Pmbus),
    Ina260(Ina260),
    PlSequencer(PlSequencer),
}

// ---------------------------------------------------------------------------------
// PL power-domain sequencer (SLG7X644092, U169) as `xmutil pwrctl` drives it

pub const PL_SEQUENCER_ADDR: u8 = 0x68;

/// `xmutil pwrctl`: write [0x08, 0x00] = PL off, [0x08, 0x3E] = PL on; status: select
/// register 0xF5 and read one byte, 0x9A = on, 0x04 = off. Other registers: 0.
#[derive(Debug, Clone)]
pub struct PlSequencer {
    pub pl_on: bool,
    pointer: u8,
}

impl PlSequencer {
    fn new() -> PlSequencer {
        PlSequencer {
            pl_on: true,
            pointer: 0,
        }
    }
    fn read(&self, reg: u8) -> u8 {
        match reg {
            0xF5 if self.pl_on => 0x9A,
            0xF5 => 0x04,
            0x08 if self.pl_on => 0x3E,
            _ => 0,
        }
    }
    fn transact(&mut self, req: &Request) -> Response {
        match req.op {
            Op::WriteByteData if req.cmd == 0x08 => {
                match req.data[0] {
                    0x00 => self.pl_on = false,
                    0x3E => self.pl_on = true,
                    _ => {}
                }
                Response::ok(vec![])
            }
            Op::WriteByteData => Response::ok(vec![]),
            Op::SendByte => {
                self.pointer = req.cmd;
                Response::ok(vec![])
            }
            Op::ReceiveByte => Response::ok(vec![self.read(self.pointer)]),
            Op::ReadByteData => Response::ok(vec![self.read(req.cmd)]),
            _ => Response::err(Status::DataNack),
        }
    }
}

/// Where a rail's output lives on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailRef {
    pub addr: u8,
    /// DA913x channel (0/1); 0 for PMBus.
    pub channel: usize,
}

#[derive(Debug, Clone)]
pub struct Bus {
    pub devices: BTreeMap<u8, Device>,
}

/// DA913x VOUT register -> channel.
pub fn da_channel(register: u8) -> Option<usize> {
    match register {
        DA_BUCK1_5 => Some(0),
        r if r == DA_BUCK1_5 + DA_CH2 => Some(1),
        _ => None,
    }
}

impl Bus {
    /// Build the devices of the rails on one bus. The INA260 (0x40) and the PL sequencer
    /// (0x68) sit on it when `with_ina260` (the SOM's I2C1).
    pub fn from_rails(rails: &[&Rail], slew: f64, with_ina260: bool) -> Result<Bus, String> {
        let mut devices = BTreeMap::new();
        let mut da_nominal: BTreeMap<u8, [Option<f64>; 2]> = BTreeMap::new();
        for r in rails {
            match r.driver {
                RailDriver::Da913x => {
                    let ch = da_channel(r.register).ok_or_else(|| {
                        format!(
                            "rail {}: DA913x VOUT register must be 0x25 or 0x2D, got {:#04x}",
                            r.name, r.register
                        )
                    })?;
                    da_nominal.entry(r.address).or_default()[ch] = Some(f64::from(r.nominal_mv));
                }
                RailDriver::Pmbus => {
                    if r.register != 0 {
                        return Err(format!(
                            "rail {}: the emulated PMBus device has only page 0",
                            r.name
                        ));
                    }
                    devices.insert(
                        r.address,
                        Device::Pmbus(Pmbus::new(f64::from(r.nominal_mv), slew)),
                    );
                }
            }
        }
        for (a, nom) in da_nominal {
            if devices.contains_key(&a) {
                return Err(format!("two device types at I2C address {a:#04x}"));
            }
            devices.insert(a, Device::Da913x(Box::new(Da913x::new(nom, slew))));
        }
        if with_ina260 {
            devices
                .entry(0x40)
                .or_insert_with(|| Device::Ina260(Ina260::new()));
            devices
                .entry(PL_SEQUENCER_ADDR)
                .or_insert_with(|| Device::PlSequencer(PlSequencer::new()));
        }
        Ok(Bus { devices })
    }

    /// Whether the PL power domain is on (always, on a bus without the sequencer).
    pub fn pl_on(&self) -> bool {
        !self
            .devices
            .values()
            .any(|d| matches!(d, Device::PlSequencer(p) if !p.pl_on))
    }

    pub fn rail_ref(rail: &Rail) -> RailRef {
        let channel = match rail.driver {
            RailDriver::Da913x => da_channel(rail.register).unwrap_or(0),
            RailDriver::Pmbus => 0,
        };
        RailRef {
            addr: rail.address,
            channel,
        }
    }

    /// Power-on defaults for every device.
    pub fn reset(&mut self) {
        for d in self.devices.values_mut() {
            match d {
                Device::Da913x(x) => x.reset(),
                Device::Pmbus(x) => x.reset(),
                Device::Ina260(x) => *x = Ina260::new(),
                Device::PlSequencer(x) => *x = PlSequencer::new(),
            }
        }
    }

    /// (present output, final target, enabled) of a rail.
    pub fn rail_state(&self, r: RailRef, now: Instant) -> Option<(f64, f64, bool)> {
        match self.devices.get(&r.addr)? {
            Device::Da913x(d) => Some((
                d.output_mv(r.channel, now)?,
                d.target_mv(r.channel)?,
                d.is_enabled(r.channel),
            )),
            Device::Pmbus(p) => Some((p.output_mv(now), p.out.target(), p.operation & 0x80 != 0)),
            Device::Ina260(_) | Device::PlSequencer(_) => None,
        }
    }

    /// One SMBus transaction. `pec` is the PEC byte a write carried, if any.
    pub fn transact(
        &mut self,
        req: &Request,
        pec: Option<u8>,
        now: Instant,
        s: &SensorView,
    ) -> Response {
        let Some(dev) = self.devices.get_mut(&req.addr) else {
            return Response::err(Status::AddrNack);
        };
        if let Some(p) = pec
            && p != req.write_pec()
        {
            if let Device::Pmbus(pm) = dev {
                pm.pec_failed();
            }
            return Response::err(Status::BadPec);
        }
        match dev {
            Device::Da913x(d) => d.transact(req, now),
            Device::Pmbus(p) => p.transact(req, now, s),
            Device::Ina260(i) => i.transact(req, s),
            Device::PlSequencer(p) => p.transact(req),
        }
    }
}

/// Buses of a board file, keyed by the socket path as written in the file.
pub fn buses_of(board: &BoardFile, slew: f64) -> Result<BTreeMap<std::path::PathBuf, Bus>, String> {
    let mut by_bus: BTreeMap<std::path::PathBuf, Vec<&Rail>> = BTreeMap::new();
    for r in &board.rails {
        let p = match &r.bus {
            proto::board::I2cBus::Socket(p) | proto::board::I2cBus::Dev(p) => p.clone(),
        };
        by_bus.entry(p).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for (i, (p, rails)) in by_bus.into_iter().enumerate() {
        out.insert(p, Bus::from_rails(&rails, slew, i == 0)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn da() -> Da913x {
        Da913x::new([Some(850.0), None], 1e9)
    }

    fn rw(d: &mut Da913x, reg: u8, v: u8) {
        let r = d.transact(&Request::write_byte_data(0x32, reg, v), Instant::now());
        assert_eq!(r.status, Status::Ok);
    }
    fn rd(d: &mut Da913x, reg: u8) -> u8 {
        d.transact(&Request::read_byte_data(0x32, reg), Instant::now())
            .byte()
            .unwrap()
    }

    #[test]
    fn da913x_vout_vmax_and_clamps() {
        let mut d = da();
        let now = Instant::now();
        assert_eq!(rd(&mut d, DA_BUCK1_5), 0x55);
        assert_eq!(rd(&mut d, DA_DEVICE_ID), 0x05);
        assert_eq!(d.output_mv(0, now), Some(850.0));
        rw(&mut d, DA_BUCK1_5, 60);
        assert_eq!(d.target_mv(0), Some(600.0));
        // Below the table: 0.3 V; register keeps what was written.
        rw(&mut d, DA_BUCK1_5, 3);
        assert_eq!(d.target_mv(0), Some(300.0));
        assert_eq!(rd(&mut d, DA_BUCK1_5), 3);
        // Above VMAX (nominal + 100 mV): clamped.
        rw(&mut d, DA_BUCK1_5, 0xFF);
        assert_eq!(d.target_mv(0), Some(950.0));
        // Read-only: device id, status.
        rw(&mut d, DA_DEVICE_ID, 0x77);
        assert_eq!(rd(&mut d, DA_DEVICE_ID), 0x05);
        rw(&mut d, 0x55, 0x12); // unknown register: ignored, reads 0
        assert_eq!(rd(&mut d, 0x55), 0);
        // Power good once settled.
        rw(&mut d, DA_BUCK1_5, 0x55);
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert_eq!(rd(&mut d, DA_SYS_STATUS_1) & 0x08, 0x08);
        rw(&mut d, DA_BUCK1_0, 0);
        assert!(!d.is_enabled(0));
        assert_eq!(d.target_mv(0), Some(0.0));
    }

    #[test]
    fn ramp_follows_slew() {
        let mut o = Output::steady(850.0, 20.0);
        let t0 = Instant::now();
        o.set(450.0, t0);
        assert!((o.at(t0 + std::time::Duration::from_micros(10)) - 650.0).abs() < 1e-6);
        assert_eq!(o.at(t0 + std::time::Duration::from_micros(30)), 450.0);
    }

    #[test]
    fn pmbus_linear16_and_status() {
        use pmbus::*;
        let mut p = Pmbus::new(1200.0, 1e9);
        let s = SensorView::default();
        let now = Instant::now();
        let r = p.transact(&Request::read_byte_data(0x13, VOUT_MODE), now, &s);
        assert_eq!(r.byte(), Some(0x14));
        let r = p.transact(&Request::read_word_data(0x13, VOUT_COMMAND), now, &s);
        assert_eq!(r.word(), Some(4915)); // 1.2 V * 4096
        p.transact(&Request::write_word_data(0x13, VOUT_COMMAND, 4506), now, &s); // 1.1 V
        let later = Instant::now();
        let v = p
            .transact(&Request::read_word_data(0x13, READ_VOUT), later, &s)
            .word()
            .unwrap();
        assert!((f64::from(v) / 4096.0 - 1.1).abs() < 0.001);
        // Above VOUT_MAX: limited and flagged.
        p.transact(
            &Request::write_word_data(0x13, VOUT_COMMAND, 0xFFFF),
            now,
            &s,
        );
        assert_eq!(p.out.target(), l16_to_mv(mv_to_l16(1200.0 * 1.15)));
        let sw = p
            .transact(&Request::read_word_data(0x13, STATUS_WORD), now, &s)
            .word()
            .unwrap();
        assert_ne!(sw & 0x8000, 0);
        // Unknown command: NACK and CML.
        let r = p.transact(&Request::read_word_data(0x13, 0xD7), now, &s);
        assert_eq!(r.status, Status::DataNack);
        let cml = p
            .transact(&Request::read_byte_data(0x13, STATUS_CML), now, &s)
            .byte()
            .unwrap();
        assert_eq!(cml & CML_INVALID_COMMAND, CML_INVALID_COMMAND);
        p.transact(&Request::send_byte(0x13, CLEAR_FAULTS), now, &s);
        assert_eq!(
            p.transact(&Request::read_word_data(0x13, STATUS_WORD), now, &s)
                .word(),
            Some(0)
        );
    }

    #[test]
    fn linear11_roundtrip() {
        for v in [0.0, 0.4, 1.25, 45.5, -3.0, 1000.0] {
            let back = from_linear11(linear11(v));
            assert!((back - v).abs() <= v.abs() / 500.0 + 0.002, "{v} -> {back}");
        }
    }
}
