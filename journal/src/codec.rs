//! The one module that knows the on-disk encoding (bincode 1.3.3, pinned).
//! TODO(helper): envelope = magic b"VSNR", format version u16 LE, payload
//! length u32 LE, crc32 (of payload) u32 LE, then the bincode payload.
use serde::{de::DeserializeOwned, Serialize};

/// Format version written in every envelope.
pub const FORMAT_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic {0:02x?}")]
    BadMagic(Vec<u8>),
    #[error("format version {found}, this build reads {expected}")]
    Version { found: u16, expected: u16 },
    #[error("length {declared} declared, {actual} present")]
    Length { declared: usize, actual: usize },
    #[error("checksum {found:08x}, expected {expected:08x}")]
    Checksum { found: u32, expected: u32 },
    #[error("undecodable payload: {0}")]
    Payload(String),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let _ = value;
    todo!()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let _ = bytes;
    todo!()
}
