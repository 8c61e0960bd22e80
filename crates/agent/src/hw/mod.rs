//! Hardware access: each module is the real Linux implementation (the emulator exposes
//! the same interfaces: a memory file, hwmon directories, an SMBus socket).

pub mod devmem;
pub mod hwmon;
pub mod i2c;
pub mod regulator;
pub mod smbus_socket;
