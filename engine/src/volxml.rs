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
    /// `<name>`.
    pub name: Option<String>,
    /// `<description>`.
    pub description: Option<String>,
    /// `<kind>`.
    pub kind: Option<SnapKind>,
    /// `<file>`.
    pub file: Option<PathBuf>,
}

const ALLOWED: &str = "name, description, kind, file (and, as written by dumpxml, creationTime, parent, volume, current)";

fn xml_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Xml(e.to_string())
}

/// Parse a `<volsnapshot>` document.
///
/// An element's text is all of its text: pieces split by comments or
/// CDATA sections are joined (`s<!-- -->1` is `s1`), then trimmed. Each
/// element may appear once; an empty `<name>` is refused (leave `<name>`
/// out for the default name).
pub fn parse_volsnapshot(text: &str) -> Result<VolSnapshotSpec> {
    crate::check_xml_size(text.len())?;
    let mut r = Reader::from_str(text);
    r.config_mut().trim_text(false);
    let mut spec = VolSnapshotSpec::default();
    // The path of open elements below the root, with the text gathered
    // for the innermost.
    let mut stack: Vec<String> = Vec::new();
    let mut buf = String::new();
    let mut seen: Vec<String> = Vec::new();
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
            Event::Start(e) | Event::Empty(e) => {
                if done_root {
                    return Err(EngineError::Xml("content after </volsnapshot>".into()));
                }
                let n = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                check_element(&stack, &n)?;
                if !buf.trim().is_empty() {
                    return Err(misplaced_text(&stack, &buf));
                }
                buf.clear();
                stack.push(n);
                let key = stack.join("><");
                if seen.contains(&key) {
                    return Err(EngineError::Xml(format!(
                        "<{key}> appears twice; give it once"
                    )));
                }
                seen.push(key);
                if is_empty {
                    set_value(&mut spec, &stack, "")?;
                    stack.pop();
                }
            }
            Event::End(_) => {
                if stack.is_empty() {
                    if !buf.trim().is_empty() {
                        return Err(misplaced_text(&stack, &buf));
                    }
                    done_root = true;
                } else {
                    let v = std::mem::take(&mut buf);
                    if stack.len() == 1 && stack[0] == "parent" {
                        if !v.trim().is_empty() {
                            return Err(misplaced_text(&stack, &v));
                        }
                    } else {
                        set_value(&mut spec, &stack, &v)?;
                    }
                    stack.pop();
                }
                buf.clear();
            }
            Event::Text(t) => {
                let v = t.unescape().map_err(xml_err)?;
                if !seen_root || done_root {
                    if !v.trim().is_empty() {
                        return Err(EngineError::Xml("text outside <volsnapshot>".into()));
                    }
                } else {
                    buf.push_str(&v);
                }
            }
            Event::CData(t) => {
                if !seen_root || done_root {
                    return Err(EngineError::Xml("CDATA outside <volsnapshot>".into()));
                }
                buf.push_str(&String::from_utf8_lossy(&t));
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

fn misplaced_text(stack: &[String], v: &str) -> EngineError {
    if stack.is_empty() {
        EngineError::Xml(format!(
            "unexpected text {:?} directly inside <volsnapshot>",
            v.trim()
        ))
    } else {
        EngineError::Xml(format!("unexpected text inside <{}>", stack.join("><")))
    }
}

/// The whole text `v` of the element at `path` (trimmed here).
fn set_value(spec: &mut VolSnapshotSpec, path: &[String], v: &str) -> Result<()> {
    let v = v.trim();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match path.as_slice() {
        ["name"] => {
            if v.is_empty() {
                return Err(EngineError::Xml(
                    "<name> is empty; give a name, or leave <name> out for the default (the creation time)".into(),
                ));
            }
            spec.name = Some(v.to_string())
        }
        ["description"] => spec.description = Some(v.to_string()),
        ["kind"] => {
            spec.kind = Some(SnapKind::parse(v).ok_or_else(|| {
                EngineError::Xml(format!(
                    "<kind>{v}</kind>: expected internal, external, reflink or copy"
                ))
            })?)
        }
        ["file"] => {
            if v.is_empty() {
                return Err(EngineError::Xml(
                    "<file> is empty; give a path, or leave <file> out for the default".into(),
                ));
            }
            spec.file = Some(PathBuf::from(v))
        }
        // Output only; ignored on input.
        _ => {}
    }
    Ok(())
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
    fn text_split_by_comments_or_cdata_is_read_whole() {
        let s = parse_volsnapshot(
            "<volsnapshot><name>s<!-- x -->1</name><description>a<![CDATA[<b>]]>c</description></volsnapshot>",
        )
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("s1"));
        assert_eq!(s.description.as_deref(), Some("a<b>c"));
        let s = parse_volsnapshot("<volsnapshot><name> s<!---->1 </name></volsnapshot>").unwrap();
        assert_eq!(s.name.as_deref(), Some("s1"));
    }

    #[test]
    fn empty_or_repeated_elements_are_refused() {
        for (bad, says) in [
            (
                "<volsnapshot><name></name></volsnapshot>",
                "<name> is empty",
            ),
            ("<volsnapshot><name/></volsnapshot>", "<name> is empty"),
            (
                "<volsnapshot><name> <!-- --> </name></volsnapshot>",
                "<name> is empty",
            ),
            (
                "<volsnapshot><file></file></volsnapshot>",
                "<file> is empty",
            ),
            (
                "<volsnapshot><name>a</name><name>b</name></volsnapshot>",
                "<name> appears twice",
            ),
            (
                "<volsnapshot><kind>copy</kind><kind>external</kind></volsnapshot>",
                "<kind> appears twice",
            ),
            (
                "<volsnapshot><parent><name>a</name><name>b</name></parent></volsnapshot>",
                "<parent><name> appears twice",
            ),
        ] {
            let e = parse_volsnapshot(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
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
