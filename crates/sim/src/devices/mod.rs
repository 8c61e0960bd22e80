//! Everything on the board besides the accelerator: regulators on the I2C bus, the
//! hwmon sensor tree, the console UART and the lab power switch.

pub mod console;
pub mod hwmon;
pub mod i2c;
pub mod power;
pub mod regulator;
