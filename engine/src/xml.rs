//! XML formats: `<volsnapshot>` (the seed's element).
//!
//! ```xml
//! <volsnapshot>
//!   <name>s1</name>                       <!-- optional on input -->
//!   <description>before upgrade</description>
//!   <kind>external</kind>                 <!-- internal|external|reflink|copy -->
//!   <file>/vm/a.s1.qcow2</file>           <!-- external, reflink, copy -->
//!   <creationTime>1764167000</creationTime>  <!-- output; ignored on input -->
//!   <parent><name>s0</name></parent>      <!-- output; ignored on input -->
//!   <volume>/vm/a.qcow2</volume>          <!-- output; ignored on input -->
//!   <current>yes</current>                <!-- output; ignored on input -->
//! </volsnapshot>
//! ```
//!
//! Input is strict: an unknown element is an error that names it, so a
//! typo never silently becomes a default.

use crate::catalog::{SnapKind, VolSnapshot};
use crate::{EngineError, Result};
use quick_xml::events::Event;
use quick_xml::Reader;
use std::path::PathBuf;

/// What a `<volsnapshot>` document asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolSnapshotSpec {
    pub name: Option<String>,
    pub description: Option<String>,
    pub kind: Option<SnapKind>,
    pub file: Option<PathBuf>,
}

const ALLOWED: &str = "name, description, kind, file (and, as written by dumpxml, creationTime, parent, volume, current)";

fn xml_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Xml(e.to_string())
}

/// Parse a `<volsnapshot>` document.
pub fn parse_volsnapshot(text: &str) -> Result<VolSnapshotSpec> {
    let mut r = Reader::from_str(text);
    r.config_mut().trim_text(true);
    let mut spec = VolSnapshotSpec::default();
    // The path of open elements below the root.
    let mut stack: Vec<String> = Vec::new();
    let mut seen_root = false;
    let mut done_root = false;
    loop {
        let pos = r.buffer_position();
        let ev = r
            .read_event()
            .map_err(|e| EngineError::Xml(format!("at byte {pos}: {e}")))?;
        let is_empty = matches!(ev, Event::Empty(_));
        match ev {
            Event::Start(e) | Event::Empty(e) if !seen_root => {
                let n = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if n != "volsnapshot" {
                    return Err(EngineError::Xml(format!(
                        "the root element is <{n}>; expected <volsnapshot>"
                    )));
                }
                seen_root = true;
                done_root = is_empty;
            }
            Event::Start(e) => {
                if done_root {
                    return Err(EngineError::Xml("content after </volsnapshot>".into()));
                }
                let n = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                check_element(&stack, &n)?;
                stack.push(n);
            }
            Event::Empty(e) => {
                if done_root {
                    return Err(EngineError::Xml("content after </volsnapshot>".into()));
                }
                let n = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                check_element(&stack, &n)?;
            }
            Event::End(_) => {
                if stack.pop().is_none() {
                    done_root = true;
                }
            }
            Event::Text(t) => {
                let v = t.unescape().map_err(xml_err)?.into_owned();
                let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                match path.as_slice() {
                    ["name"] => spec.name = Some(v),
                    ["description"] => spec.description = Some(v),
                    ["kind"] => {
                        spec.kind = Some(SnapKind::parse(&v).ok_or_else(|| {
                            EngineError::Xml(format!(
                                "<kind>{v}</kind>: expected internal, external, reflink or copy"
                            ))
                        })?)
                    }
                    ["file"] => spec.file = Some(PathBuf::from(v)),
                    ["creationTime"] | ["parent", "name"] | ["volume"] | ["current"] => {}
                    [] => {
                        return Err(EngineError::Xml(format!(
                            "unexpected text {v:?} directly inside <volsnapshot>"
                        )))
                    }
                    _ => {
                        return Err(EngineError::Xml(format!(
                            "unexpected text inside <{}>",
                            path.join("><")
                        )))
                    }
                }
            }
            Event::CData(_) => {
                return Err(EngineError::Xml(
                    "CDATA is not accepted in <volsnapshot>".into(),
                ))
            }
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !seen_root {
        return Err(EngineError::Xml(
            "empty document; expected <volsnapshot>".into(),
        ));
    }
    if !stack.is_empty() {
        return Err(EngineError::Xml(format!(
            "unclosed element <{}>",
            stack.join("><")
        )));
    }
    if !done_root {
        return Err(EngineError::Xml("unclosed element <volsnapshot>".into()));
    }
    Ok(spec)
}

fn check_element(stack: &[String], name: &str) -> Result<()> {
    let ok = match stack {
        [] => matches!(
            name,
            "name"
                | "description"
                | "kind"
                | "file"
                | "creationTime"
                | "parent"
                | "volume"
                | "current"
        ),
        [p] if p == "parent" => name == "name",
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let inside = if stack.is_empty() {
            "volsnapshot".to_string()
        } else {
            stack.join("><")
        };
        Err(EngineError::Xml(format!(
            "unknown element <{name}> in <{inside}>; allowed in <volsnapshot>: {ALLOWED}"
        )))
    }
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Render a snapshot as `<volsnapshot>`.
pub fn volsnapshot_to_xml(s: &VolSnapshot, current: bool) -> String {
    let mut x = String::from("<volsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&s.name)));
    if let Some(d) = &s.description {
        x.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    x.push_str(&format!("  <kind>{}</kind>\n", s.kind));
    if let Some(f) = &s.file {
        x.push_str(&format!("  <file>{}</file>\n", esc(&f.to_string_lossy())));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        s.creation_time
    ));
    if let Some(p) = &s.parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            esc(p)
        ));
    }
    x.push_str(&format!(
        "  <volume>{}</volume>\n",
        esc(&s.volume.to_string_lossy())
    ));
    x.push_str(&format!(
        "  <current>{}</current>\n",
        if current { "yes" } else { "no" }
    ));
    x.push_str("</volsnapshot>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_document() {
        let s = parse_volsnapshot(
            "<?xml version='1.0'?>\n<volsnapshot>\n <name>s1</name>\n <description>a &amp; b</description>\n <kind>external</kind>\n <file>/vm/x.qcow2</file>\n</volsnapshot>",
        )
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("s1"));
        assert_eq!(s.description.as_deref(), Some("a & b"));
        assert_eq!(s.kind, Some(SnapKind::External));
        assert_eq!(s.file, Some(PathBuf::from("/vm/x.qcow2")));
    }

    #[test]
    fn round_trips_its_own_output() {
        let snap = VolSnapshot {
            name: "s<1>".into(),
            volume: "/vm/a.qcow2".into(),
            kind: SnapKind::Copy,
            description: Some("d".into()),
            creation_time: 5,
            parent: Some("s0".into()),
            seq: 1,
            file: Some("/vm/a.s1.qcow2".into()),
            format: vsnap_steps::Format::Qcow2,
        };
        let spec = parse_volsnapshot(&volsnapshot_to_xml(&snap, true)).unwrap();
        assert_eq!(spec.name.as_deref(), Some("s<1>"));
        assert_eq!(spec.kind, Some(SnapKind::Copy));
        assert_eq!(spec.file, snap.file);
    }

    #[test]
    fn names_an_unknown_element() {
        let e = parse_volsnapshot("<volsnapshot><name>a</name><colour>red</colour></volsnapshot>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown element <colour>"), "{e}");
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            "",
            "<volsnapshot><name>a</volsnapshot>",
            "<domainsnapshot/>",
            "<volsnapshot><kind>weird</kind></volsnapshot>",
            "<volsnapshot>text</volsnapshot>",
            "<volsnapshot><name>a</name>",
        ] {
            assert!(parse_volsnapshot(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn accepts_an_empty_root() {
        assert_eq!(
            parse_volsnapshot("<volsnapshot/>").unwrap(),
            VolSnapshotSpec::default()
        );
    }
}
