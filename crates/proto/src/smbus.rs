//! SMBus transactions over a byte stream: how the emulated board's I2C bus is reached.
//!
//! On a real board the agent talks to regulators through `/dev/i2c-N` (i2c-dev ioctls:
//! `I2C_SLAVE_FORCE` + `I2C_SMBUS`). On the emulator the same transactions travel over a
//! Unix stream socket (`Socket(i2c-1.sock)` in the board file), one request then one
//! response, strictly alternating, any number per connection. Only the transport
//! differs: the register protocol of the devices behind it is the hardware's.
//!
//! Request frame (client -> bus):
//!
//! ```text
//! [op | 0x80 if PEC] [addr7] [cmd] [len] [data; len] [pec; 1 if PEC and op is a write]
//! ```
//!
//! Response frame (bus -> client):
//!
//! ```text
//! [status] [len] [data; len] [pec; 1 if the request asked PEC, op is a read and status is Ok]
//! ```
//!
//! `len` counts data bytes only. Words are little-endian (SMBus: low byte first).
//! PEC is CRC-8 (poly 0x07, init 0) over the whole SMBus message as it would be on the
//! wire, address bytes included (see [`Request::write_pec`] and [`read_pec`]). A write
//! whose PEC is wrong is refused with [`Status::BadPec`] and has no effect, as on a
//! PMBus device that checks PEC.
//!
//! | op | name | request data | response data |
//! |---|---|---|---|
//! | 0x01 | receive byte (`i2c_smbus_read_byte`), `cmd` ignored | 0 | 1 |
//! | 0x02 | send byte (`i2c_smbus_write_byte`), the byte is `cmd` | 0 | 0 |
//! | 0x03 | read byte data | 0 | 1 |
//! | 0x04 | write byte data | 1 | 0 |
//! | 0x05 | read word data | 0 | 2 |
//! | 0x06 | write word data | 2 | 0 |
//! | 0x07 | read block data | 0 | 1..=32 |
//! | 0x08 | write block data | 1..=32 | 0 |

use std::io::{self, Read, Write};

/// Largest SMBus block.
pub const MAX_BLOCK: usize = 32;
/// Bit 7 of the op byte: packet error checking requested.
pub const PEC_FLAG: u8 = 0x80;
/// Longest request frame: header, a full block, PEC.
pub const MAX_REQUEST_BYTES: usize = 4 + MAX_BLOCK + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    ReceiveByte = 0x01,
    SendByte = 0x02,
    ReadByteData = 0x03,
    WriteByteData = 0x04,
    ReadWordData = 0x05,
    WriteWordData = 0x06,
    ReadBlockData = 0x07,
    WriteBlockData = 0x08,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0x01 => Op::ReceiveByte,
            0x02 => Op::SendByte,
            0x03 => Op::ReadByteData,
            0x04 => Op::WriteByteData,
            0x05 => Op::ReadWordData,
            0x06 => Op::WriteWordData,
            0x07 => Op::ReadBlockData,
            0x08 => Op::WriteBlockData,
            _ => return None,
        })
    }

    pub fn is_read(self) -> bool {
        matches!(
            self,
            Op::ReceiveByte | Op::ReadByteData | Op::ReadWordData | Op::ReadBlockData
        )
    }

    /// Allowed request data lengths.
    fn request_len_ok(self, len: usize) -> bool {
        match self {
            Op::WriteByteData => len == 1,
            Op::WriteWordData => len == 2,
            Op::WriteBlockData => (1..=MAX_BLOCK).contains(&len),
            _ => len == 0,
        }
    }

    /// Allowed response data lengths when the status is Ok.
    fn response_len_ok(self, len: usize) -> bool {
        match self {
            Op::ReceiveByte | Op::ReadByteData => len == 1,
            Op::ReadWordData => len == 2,
            Op::ReadBlockData => (1..=MAX_BLOCK).contains(&len),
            _ => len == 0,
        }
    }
}

/// Outcome of a transaction. [`Status::errno`] gives what the i2c-dev ioctl would fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0x00,
    /// Nobody acknowledged the address (i2c-dev: ENXIO).
    AddrNack = 0x01,
    /// The device acknowledged its address but refused the command or data (EIO).
    DataNack = 0x02,
    /// The device checked PEC and it was wrong; the write had no effect (EBADMSG).
    BadPec = 0x03,
    /// The request frame was malformed (EINVAL).
    Malformed = 0x04,
    /// The transaction type is not supported by the bus (EOPNOTSUPP).
    Unsupported = 0x05,
    /// Bus timeout, e.g. a device holding SCL low (ETIMEDOUT).
    Timeout = 0x06,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0x00 => Status::Ok,
            0x01 => Status::AddrNack,
            0x02 => Status::DataNack,
            0x03 => Status::BadPec,
            0x04 => Status::Malformed,
            0x05 => Status::Unsupported,
            0x06 => Status::Timeout,
            _ => return None,
        })
    }

    /// The errno the same failure gives through `/dev/i2c-N`.
    pub fn errno(self) -> i32 {
        match self {
            Status::Ok => 0,
            Status::AddrNack => 6,     // ENXIO
            Status::DataNack => 5,     // EIO
            Status::BadPec => 74,      // EBADMSG
            Status::Malformed => 22,   // EINVAL
            Status::Unsupported => 95, // EOPNOTSUPP
            Status::Timeout => 110,    // ETIMEDOUT
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmbusError {
    #[error("smbus transport: {0}")]
    Io(#[from] io::Error),
    #[error("smbus frame: unknown op byte {0:#04x}")]
    UnknownOp(u8),
    #[error("smbus frame: unknown status byte {0:#04x}")]
    UnknownStatus(u8),
    #[error("smbus frame: {op:?} cannot carry {len} data bytes")]
    BadLength { op: Op, len: usize },
    #[error("smbus frame: address {0:#04x} is not a 7-bit address")]
    BadAddress(u8),
    #[error("smbus: PEC mismatch on {op:?} from {addr:#04x}: got {got:#04x}, expected {want:#04x}")]
    PecMismatch { op: Op, addr: u8, got: u8, want: u8 },
    #[error("smbus: the bus closed the connection")]
    Closed,
}

/// CRC-8, polynomial x^8 + x^2 + x + 1 (0x07), initial value 0: the SMBus PEC.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &b in bytes {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// 7-bit address.
    pub addr: u8,
    /// Command (register) byte; for send byte, the byte sent.
    pub cmd: u8,
    pub pec: bool,
    pub data: Vec<u8>,
}

impl Request {
    fn new(op: Op, addr: u8, cmd: u8, data: Vec<u8>) -> Request {
        Request {
            op,
            addr,
            cmd,
            pec: false,
            data,
        }
    }
    pub fn receive_byte(addr: u8) -> Request {
        Request::new(Op::ReceiveByte, addr, 0, vec![])
    }
    pub fn send_byte(addr: u8, byte: u8) -> Request {
        Request::new(Op::SendByte, addr, byte, vec![])
    }
    pub fn read_byte_data(addr: u8, cmd: u8) -> Request {
        Request::new(Op::ReadByteData, addr, cmd, vec![])
    }
    pub fn write_byte_data(addr: u8, cmd: u8, v: u8) -> Request {
        Request::new(Op::WriteByteData, addr, cmd, vec![v])
    }
    pub fn read_word_data(addr: u8, cmd: u8) -> Request {
        Request::new(Op::ReadWordData, addr, cmd, vec![])
    }
    pub fn write_word_data(addr: u8, cmd: u8, v: u16) -> Request {
        Request::new(Op::WriteWordData, addr, cmd, v.to_le_bytes().to_vec())
    }
    pub fn read_block_data(addr: u8, cmd: u8) -> Request {
        Request::new(Op::ReadBlockData, addr, cmd, vec![])
    }
    pub fn write_block_data(addr: u8, cmd: u8, data: &[u8]) -> Request {
        Request::new(Op::WriteBlockData, addr, cmd, data.to_vec())
    }
    pub fn with_pec(mut self) -> Request {
        self.pec = true;
        self
    }

    /// The SMBus message a write puts on the wire before its PEC byte.
    fn write_message(&self) -> Vec<u8> {
        let mut m = vec![self.addr << 1, self.cmd];
        if self.op == Op::WriteBlockData {
            m.push(self.data.len() as u8);
        }
        m.extend_from_slice(&self.data);
        m
    }

    /// PEC of this write as the device computes it. Meaningless for reads.
    pub fn write_pec(&self) -> u8 {
        crc8(&self.write_message())
    }

    /// Check the request's shape; the decoder and the encoder both use it.
    pub fn validate(&self) -> Result<(), SmbusError> {
        if self.addr > 0x7f {
            return Err(SmbusError::BadAddress(self.addr));
        }
        if !self.op.request_len_ok(self.data.len()) {
            return Err(SmbusError::BadLength {
                op: self.op,
                len: self.data.len(),
            });
        }
        Ok(())
    }

    /// The frame bytes; a PEC byte is appended to writes when `pec` is set.
    pub fn encode(&self) -> Result<Vec<u8>, SmbusError> {
        self.validate()?;
        let mut f = vec![
            self.op as u8 | if self.pec { PEC_FLAG } else { 0 },
            self.addr,
            self.cmd,
            self.data.len() as u8,
        ];
        f.extend_from_slice(&self.data);
        if self.pec && !self.op.is_read() {
            f.push(self.write_pec());
        }
        Ok(f)
    }

    /// Decode one request from the start of `buf`. `Ok(None)`: more bytes are needed.
    /// Returns the request, the PEC byte it carried (writes with PEC only) and the bytes used.
    #[allow(clippy::type_complexity)]
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, Option<u8>, usize)>, SmbusError> {
        if buf.is_empty() {
            return Ok(None);
        }
        let op = Op::from_u8(buf[0] & !PEC_FLAG).ok_or(SmbusError::UnknownOp(buf[0]))?;
        let pec = buf[0] & PEC_FLAG != 0;
        if buf.len() < 4 {
            return Ok(None);
        }
        let (addr, cmd, len) = (buf[1], buf[2], buf[3] as usize);
        if addr > 0x7f {
            return Err(SmbusError::BadAddress(addr));
        }
        if !op.request_len_ok(len) {
            return Err(SmbusError::BadLength { op, len });
        }
        let pec_len = usize::from(pec && !op.is_read());
        let total = 4 + len + pec_len;
        if buf.len() < total {
            return Ok(None);
        }
        let req = Request {
            op,
            addr,
            cmd,
            pec,
            data: buf[4..4 + len].to_vec(),
        };
        let pec_byte = (pec_len == 1).then(|| buf[4 + len]);
        Ok(Some((req, pec_byte, total)))
    }

    /// Read one request from a stream. `Ok(None)` on a clean end of stream before
    /// the first byte.
    pub fn read_from<R: Read>(r: &mut R) -> Result<Option<(Request, Option<u8>)>, SmbusError> {
        let mut buf = Vec::with_capacity(MAX_REQUEST_BYTES);
        let mut byte = [0u8; 1];
        loop {
            match Request::decode(&buf)? {
                Some((req, pec, _)) => return Ok(Some((req, pec))),
                None => {
                    let n = r.read(&mut byte)?;
                    if n == 0 {
                        return if buf.is_empty() {
                            Ok(None)
                        } else {
                            Err(SmbusError::Closed)
                        };
                    }
                    buf.push(byte[0]);
                }
            }
        }
    }
}

/// PEC of a read transaction's data as the device sends it.
pub fn read_pec(req: &Request, data: &[u8]) -> u8 {
    let a = req.addr << 1;
    let mut m = match req.op {
        Op::ReceiveByte => vec![a | 1],
        _ => vec![a, req.cmd, a | 1],
    };
    if req.op == Op::ReadBlockData {
        m.push(data.len() as u8);
    }
    m.extend_from_slice(data);
    crc8(&m)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub data: Vec<u8>,
}

impl Response {
    pub fn ok(data: Vec<u8>) -> Response {
        Response {
            status: Status::Ok,
            data,
        }
    }
    pub fn err(status: Status) -> Response {
        Response {
            status,
            data: vec![],
        }
    }

    /// The word of a read-word response (little-endian), if that is what this is.
    pub fn word(&self) -> Option<u16> {
        (self.status == Status::Ok && self.data.len() == 2)
            .then(|| u16::from_le_bytes([self.data[0], self.data[1]]))
    }

    /// The byte of a read-byte response, if that is what this is.
    pub fn byte(&self) -> Option<u8> {
        (self.status == Status::Ok && self.data.len() == 1).then(|| self.data[0])
    }

    /// Frame bytes answering `req`; appends the read PEC when the request asked for it.
    pub fn encode(&self, req: &Request) -> Vec<u8> {
        let data: &[u8] = if self.status == Status::Ok {
            &self.data
        } else {
            &[]
        };
        let mut f = vec![self.status as u8, data.len() as u8];
        f.extend_from_slice(data);
        if self.status == Status::Ok && req.pec && req.op.is_read() {
            f.push(read_pec(req, data));
        }
        f
    }

    /// Read the response to `req` from a stream, verifying its shape and PEC.
    pub fn read_from<R: Read>(r: &mut R, req: &Request) -> Result<Response, SmbusError> {
        let mut hdr = [0u8; 2];
        read_exact_or_closed(r, &mut hdr)?;
        let status = Status::from_u8(hdr[0]).ok_or(SmbusError::UnknownStatus(hdr[0]))?;
        let len = hdr[1] as usize;
        if len > MAX_BLOCK
            || (status == Status::Ok && !req.op.response_len_ok(len))
            || (status != Status::Ok && len != 0)
        {
            return Err(SmbusError::BadLength { op: req.op, len });
        }
        let mut data = vec![0u8; len];
        read_exact_or_closed(r, &mut data)?;
        if status == Status::Ok && req.pec && req.op.is_read() {
            let mut p = [0u8; 1];
            read_exact_or_closed(r, &mut p)?;
            let want = read_pec(req, &data);
            if p[0] != want {
                return Err(SmbusError::PecMismatch {
                    op: req.op,
                    addr: req.addr,
                    got: p[0],
                    want,
                });
            }
        }
        Ok(Response { status, data })
    }
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), SmbusError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SmbusError::Closed
        } else {
            SmbusError::Io(e)
        }
    })
}

/// One transaction on a connected stream: send `req`, wait for its response.
pub fn transact<S: Read + Write>(s: &mut S, req: &Request) -> Result<Response, SmbusError> {
    s.write_all(&req.encode()?)?;
    s.flush()?;
    Response::read_from(s, req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc8_known_values() {
        // CRC-8/SMBUS check value for "123456789".
        assert_eq!(crc8(b"123456789"), 0xF4);
        assert_eq!(crc8(&[]), 0);
    }

    #[test]
    fn request_roundtrip_all_ops() {
        let reqs = [
            Request::receive_byte(0x40),
            Request::send_byte(0x13, 0x03).with_pec(),
            Request::read_byte_data(0x33, 0x25),
            Request::write_byte_data(0x33, 0x25, 0x55).with_pec(),
            Request::read_word_data(0x13, 0x8B).with_pec(),
            Request::write_word_data(0x13, 0x21, 0x0D9A),
            Request::read_block_data(0x13, 0x99),
            Request::write_block_data(0x13, 0x99, &[1, 2, 3]).with_pec(),
        ];
        for r in reqs {
            let f = r.encode().unwrap();
            let (d, pec, used) = Request::decode(&f).unwrap().unwrap();
            assert_eq!(used, f.len());
            assert_eq!(d, r);
            assert_eq!(pec.is_some(), r.pec && !r.op.is_read());
            if let Some(p) = pec {
                assert_eq!(p, r.write_pec());
            }
            // Every strict prefix asks for more bytes.
            for k in 0..f.len() {
                assert!(
                    Request::decode(&f[..k]).unwrap().is_none(),
                    "prefix {k} of {f:?}"
                );
            }
        }
    }

    #[test]
    fn word_is_little_endian() {
        let f = Request::write_word_data(0x13, 0x21, 0x1234)
            .encode()
            .unwrap();
        assert_eq!(f, vec![0x06, 0x13, 0x21, 2, 0x34, 0x12]);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert!(matches!(
            Request::decode(&[0x09, 0, 0, 0]),
            Err(SmbusError::UnknownOp(9))
        ));
        assert!(matches!(
            Request::decode(&[0x04, 0x33, 0x25, 2, 1, 2]),
            Err(SmbusError::BadLength { .. })
        ));
        assert!(matches!(
            Request::decode(&[0x08, 0x33, 0x25, 33]),
            Err(SmbusError::BadLength { .. })
        ));
        assert!(matches!(
            Request::decode(&[0x03, 0x80, 0x25, 0]),
            Err(SmbusError::BadAddress(0x80))
        ));
        for a in 0..=255u8 {
            for b in [0u8, 1, 2, 32, 255] {
                let _ = Request::decode(&[a, 0x10, 0, b, 0, 0, 0]);
            }
        }
    }

    #[test]
    fn response_roundtrip_with_pec() {
        let req = Request::read_word_data(0x13, 0x8B).with_pec();
        let resp = Response::ok(vec![0x9A, 0x0D]);
        let f = resp.encode(&req);
        assert_eq!(f.len(), 2 + 2 + 1);
        let back = Response::read_from(&mut &f[..], &req).unwrap();
        assert_eq!(back.word(), Some(0x0D9A));
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            Response::read_from(&mut &bad[..], &req),
            Err(SmbusError::PecMismatch { .. })
        ));
        let nack = Response::err(Status::AddrNack).encode(&req);
        let back = Response::read_from(&mut &nack[..], &req).unwrap();
        assert_eq!(back.status, Status::AddrNack);
        assert_eq!(back.status.errno(), 6);
        assert!(matches!(
            Response::read_from(&mut &f[..3], &req),
            Err(SmbusError::Closed)
        ));
    }
}
