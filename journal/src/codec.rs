//! The one module that knows the on-disk encoding.
//!
//! Every value the journal stores (plan headers and bodies, progress
//! records) and every catalog value the engine hands in is one *envelope*:
//!
//! | bytes   | field                                         |
//! |---------|-----------------------------------------------|
//! | 0..4    | magic `b"VSNR"`                               |
//! | 4..6    | format version, u16 little endian             |
//! | 6..10   | payload length, u32 little endian             |
//! | 10..14  | CRC-32 (crc32fast, IEEE) of the payload, u32 LE |
//! | 14..    | payload: bincode 1.3.3 (`bincode::serialize`)  |
//!
//! [`decode`] checks magic, version, length and checksum, in that order,
//! before it lets bincode see a byte, and reports the first problem as a
//! [`CodecError`]; it never panics on any input.
use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

/// Format version written in every envelope.
pub const FORMAT_VERSION: u16 = 1;

/// The four bytes every envelope starts with.
pub const MAGIC: [u8; 4] = *b"VSNR";

/// Size of the envelope header (magic, version, length, checksum).
pub const HEADER_LEN: usize = 14;

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

/// Encode `value` in an envelope.
///
/// # Panics
/// Only if bincode cannot serialize the value (a type whose `Serialize`
/// impl fails, which no vsnap type does) or the payload exceeds 4 GiB.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let payload = bincode::serialize(value).expect("bincode serializes every vsnap type");
    let len = u32::try_from(payload.len()).expect("a journal payload is below 4 GiB");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Check an envelope (magic, version, length, checksum) without decoding
/// its payload; returns the payload. This is what the journal runs on
/// catalog values, which are opaque to it.
pub fn verify(bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(CodecError::BadMagic(
            bytes[..bytes.len().min(MAGIC.len())].to_vec(),
        ));
    }
    if bytes.len() < HEADER_LEN {
        // A header cut short: report what little there is, the version
        // first when it is readable and wrong.
        if bytes.len() >= 6 {
            let found = u16::from_le_bytes([bytes[4], bytes[5]]);
            if found != FORMAT_VERSION {
                return Err(CodecError::Version {
                    found,
                    expected: FORMAT_VERSION,
                });
            }
        }
        return Err(CodecError::Length {
            declared: HEADER_LEN,
            actual: bytes.len(),
        });
    }
    let found = u16::from_le_bytes([bytes[4], bytes[5]]);
    if found != FORMAT_VERSION {
        return Err(CodecError::Version {
            found,
            expected: FORMAT_VERSION,
        });
    }
    let declared = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != declared {
        return Err(CodecError::Length {
            declared,
            actual: payload.len(),
        });
    }
    let expected = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(CodecError::Checksum { found, expected });
    }
    Ok(payload)
}

/// Decode an envelope written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let payload = verify(bytes)?;
    // Exactly the configuration of `bincode::deserialize` (fixed-width
    // integers, little endian, no size limit), except that bytes left over
    // after the value are an error rather than ignored: a payload that
    // passed its checksum but does not end where the value ends was written
    // as some other type.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .deserialize(payload)
        .map_err(|e| CodecError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Outcome, PlanHeader, Record};

    fn sample() -> Record {
        Record::Finished(Outcome::NeedsAttention("probe said: unknown".into()))
    }

    /// Re-seal a payload with a correct length and checksum.
    fn seal(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(decode::<Record>(&encode(&r)), Ok(r));
        let h = PlanHeader {
            op: "vol.snapshot.create".into(),
            summary: "s".into(),
            steps: 5,
            pivot: 2,
            created_unix: -3,
        };
        let body = vec![7u8; 1000];
        let bytes = encode(&(&h, &body));
        assert_eq!(decode::<(PlanHeader, Vec<u8>)>(&bytes), Ok((h, body)));
    }

    #[test]
    fn layout_is_fixed() {
        // Record::Done(3): bincode = variant u32 LE (1) then u32 LE (3).
        let bytes = encode(&Record::Done(3));
        assert_eq!(&bytes[..4], b"VSNR");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(&bytes[6..10], &[8, 0, 0, 0]);
        assert_eq!(&bytes[14..], &[1, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(
            u32::from_le_bytes(bytes[10..14].try_into().unwrap()),
            crc32fast::hash(&bytes[14..])
        );
        assert_eq!(
            bytes[14..],
            bincode::serialize(&Record::Done(3)).unwrap()[..]
        );
    }

    #[test]
    fn bad_magic() {
        let mut b = encode(&sample());
        b[0] = b'X';
        assert_eq!(
            decode::<Record>(&b),
            Err(CodecError::BadMagic(b"XSNR".to_vec()))
        );
        assert_eq!(decode::<Record>(b""), Err(CodecError::BadMagic(vec![])));
        assert_eq!(
            decode::<Record>(b"VS"),
            Err(CodecError::BadMagic(b"VS".to_vec()))
        );
        assert!(matches!(
            decode::<Record>(b"{\"json\": 1}"),
            Err(CodecError::BadMagic(_))
        ));
    }

    #[test]
    fn bad_version() {
        let mut b = encode(&sample());
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            decode::<Record>(&b),
            Err(CodecError::Version {
                found: 2,
                expected: FORMAT_VERSION
            })
        );
        // Even in a header cut short, a readable wrong version is named.
        assert_eq!(
            decode::<Record>(&b[..7]),
            Err(CodecError::Version {
                found: 2,
                expected: FORMAT_VERSION
            })
        );
    }

    #[test]
    fn truncated() {
        let b = encode(&sample());
        let n = b.len() - HEADER_LEN;
        // Payload cut short.
        assert_eq!(
            decode::<Record>(&b[..b.len() - 1]),
            Err(CodecError::Length {
                declared: n,
                actual: n - 1
            })
        );
        // Only the header.
        assert_eq!(
            decode::<Record>(&b[..HEADER_LEN]),
            Err(CodecError::Length {
                declared: n,
                actual: 0
            })
        );
        // Header cut short.
        assert_eq!(
            decode::<Record>(&b[..9]),
            Err(CodecError::Length {
                declared: HEADER_LEN,
                actual: 9
            })
        );
        assert_eq!(
            decode::<Record>(&b[..4]),
            Err(CodecError::Length {
                declared: HEADER_LEN,
                actual: 4
            })
        );
    }

    #[test]
    fn extra_bytes() {
        let mut b = encode(&sample());
        let n = b.len() - HEADER_LEN;
        b.push(0);
        assert_eq!(
            decode::<Record>(&b),
            Err(CodecError::Length {
                declared: n,
                actual: n + 1
            })
        );
    }

    #[test]
    fn bad_checksum() {
        let b = encode(&sample());
        let good = crc32fast::hash(&b[HEADER_LEN..]);
        // A flipped payload bit.
        let mut flipped = b.clone();
        *flipped.last_mut().unwrap() ^= 0x10;
        let found = crc32fast::hash(&flipped[HEADER_LEN..]);
        assert_eq!(
            decode::<Record>(&flipped),
            Err(CodecError::Checksum {
                found,
                expected: good
            })
        );
        // A damaged checksum field.
        let mut field = b.clone();
        field[12] ^= 0xff;
        let expected = u32::from_le_bytes(field[10..14].try_into().unwrap());
        assert_eq!(
            decode::<Record>(&field),
            Err(CodecError::Checksum {
                found: good,
                expected
            })
        );
    }

    #[test]
    fn garbage_payload() {
        // Sealed correctly, but not a Record: variant 99 does not exist.
        let b = seal(&[99, 0, 0, 0]);
        assert!(matches!(decode::<Record>(&b), Err(CodecError::Payload(_))));
        // Too short for the value.
        let b = seal(&[1, 0]);
        assert!(matches!(decode::<Record>(&b), Err(CodecError::Payload(_))));
        // A valid Record followed by trailing bytes.
        let mut p = bincode::serialize(&Record::Done(1)).unwrap();
        p.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode::<Record>(&seal(&p)),
            Err(CodecError::Payload(_))
        ));
        // A string that is not UTF-8.
        // Finished (4), NeedsAttention (2), string of 2 bytes: ff fe.
        let p = [4u8, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe];
        assert!(matches!(
            decode::<Record>(&seal(&p)),
            Err(CodecError::Payload(_))
        ));
        // A huge declared sequence length must fail, not allocate.
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<(PlanHeader, Vec<u8>)>(&seal(&p)),
            Err(CodecError::Payload(_))
        ));
    }

    #[test]
    fn verify_returns_payload() {
        let b = encode(&Record::Undone(9));
        assert_eq!(verify(&b), Ok(&b[HEADER_LEN..]));
        assert!(verify(b"raw catalog bytes").is_err());
    }

    #[test]
    fn never_panics_on_prefixes_and_bitflips() {
        let b = encode(&(
            &PlanHeader {
                op: "op".into(),
                summary: "x".repeat(40),
                steps: 3,
                pivot: 1,
                created_unix: 5,
            },
            &vec![1u8, 2, 3],
        ));
        for i in 0..b.len() {
            assert!(decode::<(PlanHeader, Vec<u8>)>(&b[..i]).is_err());
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(
                    decode::<(PlanHeader, Vec<u8>)>(&c).is_err(),
                    "flip byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }
}
