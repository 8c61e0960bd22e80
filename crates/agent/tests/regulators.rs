//! The regulator drivers and the voltage interlock against the real emulator's I2C
//! socket (the same register protocol as a DA9130/DA9131 and a LINEAR16 PMBus part).

mod common;

use std::sync::{Arc, Mutex};

use agent::board::{RailHandle, open_rails};
use agent::hw::i2c::I2cBus;
use agent::hw::regulator::{Da913x, Pmbus, Regulator, SharedBus};
use agent::hw::smbus_socket::SocketBus;
use agent::safety::{VoltageError, walk};
use common::*;
use proto::board::BoardFile;

fn bus(sim: &SimProc) -> SharedBus {
    let b: Box<dyn I2cBus> = Box::new(SocketBus::new(sim.dir.join("i2c-1.sock")));
    Arc::new(Mutex::new(b))
}

#[test]
fn da913x_and_pmbus_drivers_against_the_emulator() {
    let t = tempfile::tempdir().unwrap();
    let sim = SimProc::start(&t.path().join("sim"), 21);
    let mut vccint = Da913x::new("vccint", bus(&sim), 0x32, 0x25);
    assert_eq!(vccint.read_mv().unwrap(), 850.0);
    vccint.set_mv(840).unwrap();
    assert_eq!(vccint.read_mv().unwrap(), 840.0);
    assert_eq!(sim.vccint_mv(), Some(840));
    // Not representable: refused before any bus traffic.
    assert!(vccint.set_mv(845).is_err());
    assert_eq!(sim.vccint_mv(), Some(840));
    vccint.set_mv(850).unwrap();

    // PMBus with PEC: LINEAR16 via VOUT_MODE, READ_VOUT measures.
    let mut p = Pmbus::new("vcco_pmbus", bus(&sim), 0x13, 0);
    let v0 = p.read_mv().unwrap();
    assert!((v0 - 1200.0).abs() < 15.0, "{v0}");
    p.set_mv(1250).unwrap();
    let v1 = p.read_mv().unwrap();
    assert!((v1 - 1250.0).abs() < 15.0, "{v1}");

    // A device that is not there: a named error with the address.
    let mut ghost = Da913x::new("ghost", bus(&sim), 0x55, 0x25);
    let e = ghost.read_mv().unwrap_err().to_string();
    assert!(e.contains("0x55"), "{e}");
}

#[test]
fn walk_steps_within_limits_and_refuses_outside() {
    let t = tempfile::tempdir().unwrap();
    let sim = SimProc::start(&t.path().join("sim"), 22);
    let file = BoardFile::load(&workspace().join("board-images/boards/kv260-sim.yaml")).unwrap();
    let mut rails: Vec<RailHandle> = open_rails(&file, &sim.dir).unwrap();
    let h = rails.iter_mut().find(|r| r.cfg.name == "vccint").unwrap();
    let rb = walk(h, None, 800, true).unwrap();
    assert_eq!(rb.regulator_mv, 800.0);
    assert_eq!(sim.vccint_mv(), Some(800));
    match walk(h, None, 450, true) {
        Err(VoltageError::Refused(why)) => assert!(
            why.contains("450 mV is outside the hard limits 500..=900"),
            "{why}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        sim.vccint_mv(),
        Some(800),
        "a refusal must not touch the rail"
    );
    walk(h, None, 850, true).unwrap();
    assert_eq!(sim.vccint_mv(), Some(850));
}
