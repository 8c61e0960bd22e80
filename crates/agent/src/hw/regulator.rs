//! Voltage regulator drivers over [`I2cBus`]: the DA9121 family (DA9130/DA9131 on the
//! K26: `BUCKx_5` VOUT, code = mV / 10, 0.3..1.9 V) and generic PMBus (VOUT_MODE
//! LINEAR16, VOUT_COMMAND / READ_VOUT). Neither rounds silently: a set-point the device
//! cannot represent exactly is an error (DA913x) or lands on the nearest LSB and is read
//! back (PMBus, LSB well below 1 mV).

use std::sync::{Arc, Mutex};

use super::i2c::{I2cBus, I2cError};

pub type SharedBus = Arc<Mutex<Box<dyn I2cBus>>>;

#[derive(Debug, thiserror::Error)]
pub enum RegulatorError {
    #[error(transparent)]
    Bus(#[from] I2cError),
    #[error("{rail}: {mv} mV is not representable: {why}")]
    Unrepresentable { rail: String, mv: u32, why: String },
    #[error("{rail}: device reports {what}")]
    Device { rail: String, what: String },
}

impl RegulatorError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegulatorError::Bus(e) if e.is_unreachable())
    }
}

pub trait Regulator: Send {
    /// Program the output voltage (one write; stepping is the caller's job).
    fn set_mv(&mut self, mv: u32) -> Result<(), RegulatorError>;
    /// The programmed output (DA913x: the VOUT register) or measured output (PMBus
    /// READ_VOUT), in mV.
    fn read_mv(&mut self) -> Result<f32, RegulatorError>;
}

fn lock(bus: &SharedBus) -> std::sync::MutexGuard<'_, Box<dyn I2cBus>> {
    // A poisoned bus mutex only means another thread panicked mid-transfer; the bus
    // state is re-established by every transfer, so keep going.
    bus.lock().unwrap_or_else(|p| p.into_inner())
}

/// DA9130 / DA9131 buck (Dialog DA9121 family).
pub struct Da913x {
    pub rail: String,
    bus: SharedBus,
    addr: u8,
    vout_reg: u8,
}

impl Da913x {
    pub const MIN_MV: u32 = 300;
    pub const MAX_MV: u32 = 1900;
    pub const MV_PER_CODE: u32 = 10;

    pub fn new(rail: &str, bus: SharedBus, addr: u8, vout_reg: u8) -> Self {
        Da913x {
            rail: rail.to_string(),
            bus,
            addr,
            vout_reg,
        }
    }

    pub fn code_for(rail: &str, mv: u32) -> Result<u8, RegulatorError> {
        if !(Self::MIN_MV..=Self::MAX_MV).contains(&mv) {
            return Err(RegulatorError::Unrepresentable {
                rail: rail.into(),
                mv,
                why: format!("DA913x range is {}..={} mV", Self::MIN_MV, Self::MAX_MV),
            });
        }
        if !mv.is_multiple_of(Self::MV_PER_CODE) {
            return Err(RegulatorError::Unrepresentable {
                rail: rail.into(),
                mv,
                why: "DA913x steps are 10 mV".into(),
            });
        }
        Ok((mv / Self::MV_PER_CODE) as u8)
    }
}

impl Regulator for Da913x {
    fn set_mv(&mut self, mv: u32) -> Result<(), RegulatorError> {
        let code = Self::code_for(&self.rail, mv)?;
        lock(&self.bus).write_byte_data(self.addr, self.vout_reg, code, false)?;
        Ok(())
    }
    fn read_mv(&mut self) -> Result<f32, RegulatorError> {
        let code = lock(&self.bus).read_byte_data(self.addr, self.vout_reg, false)?;
        Ok(f32::from(code) * Self::MV_PER_CODE as f32)
    }
}

pub mod pmbus {
    pub const PAGE: u8 = 0x00;
    pub const VOUT_MODE: u8 = 0x20;
    pub const VOUT_COMMAND: u8 = 0x21;
    pub const READ_VOUT: u8 = 0x8B;
}

/// A PMBus rail in LINEAR16 VOUT mode, with PEC.
pub struct Pmbus {
    pub rail: String,
    bus: SharedBus,
    addr: u8,
    page: u8,
    pec: bool,
}

impl Pmbus {
    pub fn new(rail: &str, bus: SharedBus, addr: u8, page: u8) -> Self {
        Pmbus {
            rail: rail.to_string(),
            bus,
            addr,
            page,
            pec: true,
        }
    }

    /// The LINEAR16 exponent from VOUT_MODE; other modes (VID, DIRECT) are refused.
    pub fn exponent(rail: &str, vout_mode: u8) -> Result<i32, RegulatorError> {
        let mode = vout_mode >> 5;
        if mode != 0 {
            return Err(RegulatorError::Device {
                rail: rail.into(),
                what: format!(
                    "VOUT_MODE {vout_mode:#04x} (mode {mode}), only LINEAR16 (0) is supported"
                ),
            });
        }
        // 5-bit two's complement.
        let e = i32::from(vout_mode & 0x1f);
        Ok(if e >= 16 { e - 32 } else { e })
    }

    pub fn mantissa_for(rail: &str, mv: u32, exp: i32) -> Result<u16, RegulatorError> {
        let m = (f64::from(mv) / 1000.0 * 2f64.powi(-exp)).round();
        if !(0.0..=65535.0).contains(&m) {
            return Err(RegulatorError::Unrepresentable {
                rail: rail.into(),
                mv,
                why: format!("mantissa {m} does not fit LINEAR16 with exponent {exp}"),
            });
        }
        Ok(m as u16)
    }

    pub fn mv_from(mantissa: u16, exp: i32) -> f32 {
        (f64::from(mantissa) * 2f64.powi(exp) * 1000.0) as f32
    }

    fn select(&mut self) -> Result<i32, RegulatorError> {
        let mut b = lock(&self.bus);
        b.write_byte_data(self.addr, pmbus::PAGE, self.page, self.pec)?;
        let mode = b.read_byte_data(self.addr, pmbus::VOUT_MODE, self.pec)?;
        drop(b);
        Self::exponent(&self.rail, mode)
    }
}

impl Regulator for Pmbus {
    fn set_mv(&mut self, mv: u32) -> Result<(), RegulatorError> {
        let exp = self.select()?;
        let m = Self::mantissa_for(&self.rail, mv, exp)?;
        lock(&self.bus).write_word_data(self.addr, pmbus::VOUT_COMMAND, m, self.pec)?;
        Ok(())
    }
    fn read_mv(&mut self) -> Result<f32, RegulatorError> {
        let exp = self.select()?;
        let m = lock(&self.bus).read_word_data(self.addr, pmbus::READ_VOUT, self.pec)?;
        Ok(Self::mv_from(m, exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn da913x_codes() {
        assert_eq!(Da913x::code_for("v", 850).unwrap(), 0x55);
        assert_eq!(Da913x::code_for("v", 720).unwrap(), 0x48);
        assert_eq!(Da913x::code_for("v", 300).unwrap(), 30);
        assert_eq!(Da913x::code_for("v", 1900).unwrap(), 190);
        let e = Da913x::code_for("vccint", 855).unwrap_err().to_string();
        assert!(
            e.contains("vccint") && e.contains("855") && e.contains("10 mV"),
            "{e}"
        );
        assert!(Da913x::code_for("v", 290).is_err());
        assert!(Da913x::code_for("v", 1910).is_err());
    }

    #[test]
    fn linear16() {
        // KC705 UCD9248: VOUT_MODE 0x14 = exponent -12, 0x1000 = 1.000 V.
        assert_eq!(Pmbus::exponent("v", 0x14).unwrap(), -12);
        assert_eq!(Pmbus::exponent("v", 0x17).unwrap(), -9);
        assert_eq!(Pmbus::exponent("v", 0x02).unwrap(), 2);
        assert_eq!(Pmbus::mantissa_for("v", 1000, -12).unwrap(), 0x1000);
        assert_eq!(Pmbus::mantissa_for("v", 850, -12).unwrap(), 3482);
        assert!((Pmbus::mv_from(3482, -12) - 850.1).abs() < 0.2);
        assert!(
            Pmbus::exponent("v", 0x40)
                .unwrap_err()
                .to_string()
                .contains("LINEAR16")
        );
        assert!(Pmbus::mantissa_for("v", 20000, -12).is_err());
    }
}
