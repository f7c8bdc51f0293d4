//! Paths are bytes: serde for `PathBuf` fields that carries any file name.
//!
//! serde's own `Serialize` for `Path` fails on a name that is not UTF-8
//! (and its `Deserialize` refuses one), so a plan or a catalog record that
//! names such a file could not be journaled. These `#[serde(with = ...)]`
//! helpers write:
//!
//! * in binary formats (the journal's bincode): the path's bytes. bincode
//!   encodes bytes exactly as it encodes a string (a u64 length, then the
//!   bytes), so records written before, as strings, read the same;
//! * in human-readable formats (JSON output): a string when the path is
//!   UTF-8, as before; otherwise an object
//!   `{"lossy": "<the path with U+FFFD for each invalid byte>", "hex": "<every byte of the path, two hex digits each>"}`,
//!   so a consumer can show the name and still name the exact file.
//!
//! [`json`] gives the same JSON value for one path.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The JSON form of one path (see the module's documentation).
pub fn json(p: &Path) -> serde_json::Value {
    match p.to_str() {
        Some(s) => serde_json::Value::String(s.to_string()),
        None => serde_json::json!({
            "lossy": p.to_string_lossy(),
            "hex": hex(p.as_os_str().as_bytes()),
        }),
    }
}

pub fn serialize<P: AsRef<Path> + ?Sized, S: Serializer>(p: &P, s: S) -> Result<S::Ok, S::Error> {
    let p = p.as_ref();
    let bytes = p.as_os_str().as_bytes();
    if !s.is_human_readable() {
        return s.serialize_bytes(bytes);
    }
    match p.to_str() {
        Some(x) => s.serialize_str(x),
        None => {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("lossy", &p.to_string_lossy())?;
            m.serialize_entry("hex", &hex(bytes))?;
            m.end()
        }
    }
}

struct PathVisitor;

impl<'de> Visitor<'de> for PathVisitor {
    type Value = PathBuf;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a path (bytes, a string, or {\"lossy\", \"hex\"})")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<PathBuf, E> {
        Ok(PathBuf::from(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<PathBuf, E> {
        Ok(PathBuf::from(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PathBuf, E> {
        Ok(PathBuf::from(OsString::from_vec(v.to_vec())))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<PathBuf, E> {
        Ok(PathBuf::from(OsString::from_vec(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<PathBuf, A::Error> {
        let mut out = None;
        while let Some(k) = m.next_key::<String>()? {
            let v: String = m.next_value()?;
            if k == "hex" {
                out = Some(unhex(&v).ok_or_else(|| de::Error::custom("bad hex path"))?);
            }
        }
        out.map(|b| PathBuf::from(OsString::from_vec(b)))
            .ok_or_else(|| de::Error::missing_field("hex"))
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    if d.is_human_readable() {
        d.deserialize_any(PathVisitor)
    } else {
        d.deserialize_byte_buf(PathVisitor)
    }
}

/// The same for `Option<PathBuf>`.
pub mod opt {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct P(#[serde(with = "super")] PathBuf);

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(&Ref(p)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Ok(Option::<P>::deserialize(d)?.map(|p| p.0))
    }

    struct Ref<'a>(&'a Path);
    impl serde::Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::serialize(self.0, s)
        }
    }
}

/// The same for `Vec<PathBuf>`.
pub mod vec {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize)]
    #[serde(transparent)]
    struct Ref<'a>(#[serde(with = "super")] &'a PathBuf);
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Own(#[serde(with = "super")] PathBuf);

    pub fn serialize<S: Serializer>(v: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(Ref))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        Ok(Vec::<Own>::deserialize(d)?
            .into_iter()
            .map(|o| o.0)
            .collect())
    }
}

/// The same for `Option<(PathBuf, T)>` (a backing file and its format).
pub mod opt_pair {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize)]
    struct Ref<'a, T>(#[serde(with = "super")] &'a PathBuf, &'a T);
    #[derive(Deserialize)]
    struct Own<T>(#[serde(with = "super")] PathBuf, T);

    pub fn serialize<S: Serializer, T: Serialize>(
        p: &Option<(PathBuf, T)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match p {
            Some((p, t)) => s.serialize_some(&Ref(p, t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<(PathBuf, T)>, D::Error> {
        Ok(Option::<Own<T>>::deserialize(d)?.map(|o| (o.0, o.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct R {
        #[serde(with = "super")]
        a: PathBuf,
        #[serde(with = "super::opt")]
        b: Option<PathBuf>,
        #[serde(with = "super::opt_pair")]
        c: Option<(PathBuf, u8)>,
    }

    #[derive(Serialize)]
    struct Old {
        a: PathBuf,
        b: Option<PathBuf>,
        c: Option<(PathBuf, u8)>,
    }

    fn bad() -> PathBuf {
        PathBuf::from(OsString::from_vec(b"/vm/a\xff.qcow2".to_vec()))
    }

    #[test]
    fn non_utf8_paths_round_trip_through_the_journal_codec() {
        let r = R {
            a: bad(),
            b: Some(bad()),
            c: Some((bad(), 7)),
        };
        let bytes = vsnap_journal::codec::encode(&r);
        assert_eq!(vsnap_journal::codec::decode::<R>(&bytes).unwrap(), r);
    }

    #[test]
    fn records_written_with_string_paths_read_the_same() {
        let old = Old {
            a: "/vm/a.qcow2".into(),
            b: Some("/vm/b".into()),
            c: Some(("/vm/c".into(), 1)),
        };
        let r: R = vsnap_journal::codec::decode(&vsnap_journal::codec::encode(&old)).unwrap();
        assert_eq!(r.a, old.a);
        assert_eq!(r.b, old.b);
        assert_eq!(r.c, old.c);
    }

    #[test]
    fn json_is_a_string_or_lossy_and_hex() {
        let r = R {
            a: "/vm/ok".into(),
            b: Some(bad()),
            c: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["a"], "/vm/ok");
        assert_eq!(v["b"]["lossy"], "/vm/a\u{fffd}.qcow2");
        assert_eq!(v["b"]["hex"], hex(b"/vm/a\xff.qcow2"));
        assert_eq!(json(&bad()), v["b"]);
        let back: R = serde_json::from_value(v).unwrap();
        assert_eq!(back.b, Some(bad()));
    }
}
