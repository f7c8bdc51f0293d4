//! A domain's `<domain>` document as `domain define` was given it, brought
//! up to date for `dumpxml` and for the `<domain>` a snapshot keeps.
//!
//! vsnap acts on a small part of libvirt's `<domain>` (the disks, the
//! monitor and agent sockets), but a manager round-trips the whole
//! document: what vsnap does not act on (`<address>`, `<boot>`,
//! `<serial>`, `<iotune>`, every other device, `<metadata>` of other
//! namespaces, comments) must not vanish from `dumpxml`, nor from the
//! domain a snapshot records for its revert. So the document is kept as
//! given and rewritten as a stream of quick-xml events, byte for byte
//! except where a disk changed:
//!
//! - a snapshottable disk's `<disk type=...>`, `<source file|dev=...>` and
//!   `<driver type=...>` name the catalog's active image now (after an
//!   external snapshot: the overlay; on a block device: `type='block'`
//!   with `dev=`); where the image changed, the stale `<backingStore>` is
//!   dropped (libvirt writes it from the images, and reads it as a claim
//!   about the chain);
//! - a `<driver>` is added where the document had none and the format is
//!   no longer what it meant (qcow2 over a raw image);
//! - `<vsnap:qmp>` is added inside `<metadata>` (or in a new `<metadata>`)
//!   when the monitor came from `--qmp`, so the output defines the same
//!   domain again.
//!
//! Everything else, disks vsnap cannot snapshot included, is written as it
//! was read.

use crate::catalog::dom::{DiskSource, DomainRec};
use crate::domain::XMLNS;
use crate::{EngineError, Result};
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};
use vsnap_steps::Format;

fn xml_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Xml(format!("the stored domain document: {e}"))
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().position(|b| *b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn attr_of(e: &BytesStart, key: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| local(a.key.as_ref()) == key.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// `e` with the attributes in `set` given these values (in place where the
/// element had them, appended otherwise) and those in `drop` removed;
/// `None` when that is `e` already (it is then written as it was read).
fn with_attrs(e: &BytesStart, set: &[(&str, &str)], drop: &[&str]) -> Option<BytesStart<'static>> {
    let unchanged = set
        .iter()
        .all(|(k, v)| attr_of(e, k).as_deref() == Some(*v))
        && drop.iter().all(|k| attr_of(e, k).is_none());
    if unchanged {
        return None;
    }
    // Written as libvirt writes attributes: single quotes, escaped.
    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let mut content = name.clone();
    let mut put =
        |k: &str, v: &str| content.push_str(&format!(" {k}='{}'", crate::xmltree::esc(v)));
    let mut done = vec![false; set.len()];
    for a in e.attributes().flatten() {
        let k = local(a.key.as_ref());
        if let Some(i) = set.iter().position(|(s, _)| s.as_bytes() == k) {
            if !done[i] {
                put(set[i].0, set[i].1);
                done[i] = true;
            }
        } else if !drop.iter().any(|d| d.as_bytes() == k) {
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let v = a
                .unescape_value()
                .map(|v| v.into_owned())
                .unwrap_or_default();
            put(&key, &v);
        }
    }
    for (i, (k, v)) in set.iter().enumerate() {
        if !done[i] {
            put(k, v);
        }
    }
    let len = name.len();
    Some(BytesStart::from_content(content, len))
}

/// The document `doc` (as `domain define` was given it) with the disks and
/// monitor of `d` (see the module's documentation).
pub fn rewrite(doc: &str, d: &DomainRec) -> Result<String> {
    let tree = crate::xmltree::parse(doc)?;
    let metadata = tree.child("metadata");
    let has_qmp = metadata.is_some_and(|m| m.child("qmp").is_some());
    let qmp = d.qmp.as_ref().map(|p| p.to_string_lossy().into_owned());
    let mut r = Reader::from_str(doc);
    let mut w = Writer::new(Vec::new());
    // Local names of the open elements.
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut disk: Vec<Event> = Vec::new();
    let mut disk_depth = 0usize;
    let at = |p: &[Vec<u8>], want: &[&str]| {
        p.len() == want.len() && p.iter().zip(want).all(|(a, b)| a == b.as_bytes())
    };
    loop {
        let ev = r.read_event().map_err(xml_err)?;
        if matches!(ev, Event::Eof) {
            break;
        }
        if disk_depth > 0 {
            match &ev {
                Event::Start(_) => disk_depth += 1,
                Event::End(_) => disk_depth -= 1,
                _ => {}
            }
            disk.push(ev);
            if disk_depth == 0 {
                write_disk(&mut w, std::mem::take(&mut disk), d)?;
            }
            continue;
        }
        match &ev {
            Event::Start(e)
                if at(&path, &["domain", "devices"]) && local(e.name().as_ref()) == b"disk" =>
            {
                disk_depth = 1;
                disk.push(ev);
                continue;
            }
            Event::Start(e) => path.push(local(e.name().as_ref()).to_vec()),
            Event::Text(_) if at(&path, &["domain", "metadata", "qmp"]) => {
                if let Some(q) = &qmp {
                    w.write_event(Event::Text(BytesText::new(q)))
                        .map_err(xml_err)?;
                    continue;
                }
            }
            Event::End(_) => {
                if let Some(q) = qmp.as_deref().filter(|_| !has_qmp) {
                    if at(&path, &["domain", "metadata"]) {
                        write_qmp(&mut w, q, "  ")?;
                    } else if at(&path, &["domain"]) && metadata.is_none() {
                        text(&mut w, "  ")?;
                        w.write_event(Event::Start(BytesStart::new("metadata")))
                            .map_err(xml_err)?;
                        write_qmp(&mut w, q, "    ")?;
                        text(&mut w, "  ")?;
                        w.write_event(Event::End(BytesEnd::new("metadata")))
                            .map_err(xml_err)?;
                        text(&mut w, "\n")?;
                    }
                }
                path.pop();
            }
            _ => {}
        }
        w.write_event(ev).map_err(xml_err)?;
    }
    if disk_depth > 0 {
        return Err(xml_err("a <disk> is not closed"));
    }
    String::from_utf8(w.into_inner()).map_err(xml_err)
}

/// Layout whitespace.
fn text(w: &mut Writer<Vec<u8>>, s: &str) -> Result<()> {
    w.write_event(Event::Text(BytesText::from_escaped(s)))
        .map_err(xml_err)
}

/// `<vsnap:qmp>` on a line of its own, `pad` in.
fn write_qmp(w: &mut Writer<Vec<u8>>, q: &str, pad: &str) -> Result<()> {
    text(w, &format!("\n{pad}"))?;
    let s = BytesStart::from_content(format!("vsnap:qmp xmlns:vsnap='{XMLNS}'"), 9);
    w.write_event(Event::Start(s)).map_err(xml_err)?;
    w.write_event(Event::Text(BytesText::new(q)))
        .map_err(xml_err)?;
    w.write_event(Event::End(BytesEnd::new("vsnap:qmp")))
        .map_err(xml_err)?;
    text(w, "\n")
}

/// One `<disk>` of `<devices>` (its events, start to end), rewritten for
/// the catalog's disk of the same target, or as it was.
fn write_disk(w: &mut Writer<Vec<u8>>, evs: Vec<Event>, d: &DomainRec) -> Result<()> {
    // The disk's direct children: (index of the event, local name, element).
    let mut target = None;
    let mut doc_source = None;
    let mut has_driver = false;
    let mut depth = 0usize;
    for ev in &evs[1..] {
        match ev {
            Event::Start(e) | Event::Empty(e) if depth == 0 => {
                match local(e.name().as_ref()) {
                    b"target" => target = attr_of(e, "dev"),
                    b"source" => doc_source = attr_of(e, "file").or_else(|| attr_of(e, "dev")),
                    b"driver" => has_driver = true,
                    _ => {}
                }
                if matches!(ev, Event::Start(_)) {
                    depth += 1;
                }
            }
            Event::Start(_) => depth += 1,
            Event::End(_) => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let now = target.as_deref().and_then(|t| {
        d.disks
            .iter()
            .find(|x| x.target == t)
            .and_then(|x| match &x.source {
                DiskSource::File(p) => Some((false, p, x.format)),
                DiskSource::Block(p) => Some((true, p, x.format)),
                DiskSource::Unsupported { .. } => None,
            })
    });
    let Some((block, path, format)) = now else {
        for ev in evs {
            w.write_event(ev).map_err(xml_err)?;
        }
        return Ok(());
    };
    let path = path.to_string_lossy().into_owned();
    let changed = doc_source.as_deref() != Some(path.as_str());
    let fmt = format.to_string();
    let mut depth = 0usize;
    let mut skip = 0usize;
    for (i, ev) in evs.into_iter().enumerate() {
        if skip > 0 {
            match ev {
                Event::Start(_) => skip += 1,
                Event::End(_) => skip -= 1,
                _ => {}
            }
            continue;
        }
        if i == 0 {
            let Event::Start(e) = &ev else {
                unreachable!("a buffered disk starts with its start tag")
            };
            let ty = if block { "block" } else { "file" };
            match with_attrs(e, &[("type", ty)], &[]) {
                Some(n) => w.write_event(Event::Start(n)),
                None => w.write_event(Event::Start(e.borrow())),
            }
            .map_err(xml_err)?;
            if !has_driver && (changed || format != Format::Raw) {
                let dr = BytesStart::from_content(format!("driver name='qemu' type='{fmt}'"), 6);
                w.write_event(Event::Text(BytesText::from_escaped("\n      ")))
                    .map_err(xml_err)?;
                w.write_event(Event::Empty(dr)).map_err(xml_err)?;
            }
            continue;
        }
        let direct = depth == 0;
        let out = match &ev {
            Event::Start(e) | Event::Empty(e) if direct => {
                let empty = matches!(ev, Event::Empty(_));
                let rewritten = match local(e.name().as_ref()) {
                    b"backingStore" if changed => {
                        if !empty {
                            skip = 1;
                        }
                        continue;
                    }
                    b"source" => {
                        let (k, other) = if block {
                            ("dev", "file")
                        } else {
                            ("file", "dev")
                        };
                        Some(with_attrs(e, &[(k, path.as_str())], &[other]))
                    }
                    b"driver" => Some(with_attrs(e, &[("type", fmt.as_str())], &[])),
                    _ => None,
                };
                let rewritten = rewritten.flatten();
                if !empty {
                    depth += 1;
                }
                match rewritten {
                    Some(n) if empty => Event::Empty(n),
                    Some(n) => Event::Start(n),
                    None => ev,
                }
            }
            Event::Start(_) => {
                depth += 1;
                ev
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                ev
            }
            _ => ev,
        };
        w.write_event(out).map_err(xml_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_domain_xml;
    use std::path::PathBuf;

    const DOC: &str = r#"<?xml version="1.0"?>
<!-- made by a manager -->
<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>7a3c1f2e-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>262144</memory>
  <metadata>
    <app:tag xmlns:app="https://example.org/app">gold &amp; silver</app:tag>
  </metadata>
  <devices>
    <disk type='file' device='disk' snapshot='external'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source file='/vm/a.raw' startupPolicy='optional'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <iotune><total_bytes_sec>1000000</total_bytes_sec></iotune>
      <serial>S-1</serial>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/vm/b.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
  </devices>
  <qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>
"#;

    fn rec() -> DomainRec {
        parse_domain_xml(DOC).unwrap()
    }

    #[test]
    fn an_unchanged_domain_is_written_back_byte_for_byte() {
        assert_eq!(rewrite(DOC, &rec()).unwrap(), DOC);
    }

    #[test]
    fn a_changed_disk_names_its_image_now_and_everything_else_stays() {
        let mut d = rec();
        d.disks[0].source = DiskSource::File(PathBuf::from("/vm/a.s1.qcow2"));
        d.disks[0].format = Format::Qcow2;
        d.disks[1].source = DiskSource::Block(PathBuf::from("/dev/loop7"));
        d.disks[1].format = Format::Qcow2;
        let out = rewrite(DOC, &d).unwrap();
        // vda: the overlay, qcow2; its other driver options, the source's
        // startupPolicy and every other child kept; the stale
        // <backingStore/> ("no backing file") dropped.
        assert!(
            out.contains("<driver name='qemu' type='qcow2' cache='none' io='native'/>"),
            "{out}"
        );
        assert!(
            out.contains("<source file='/vm/a.s1.qcow2' startupPolicy='optional'/>"),
            "{out}"
        );
        assert!(!out.contains("<backingStore"), "{out}");
        for kept in [
            "<iotune><total_bytes_sec>1000000</total_bytes_sec></iotune>",
            "<serial>S-1</serial>",
            "<boot order='1'/>",
            "<address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>",
            "<!-- made by a manager -->",
            "<app:tag xmlns:app=\"https://example.org/app\">gold &amp; silver</app:tag>",
            "<qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>",
            "<source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>",
            "<interface type='network'><source network='default'/><model type='virtio'/></interface>",
        ] {
            assert!(out.contains(kept), "lost {kept}: {out}");
        }
        // vdb: a block device now, and a <driver> where it had none.
        assert!(out.contains("<disk type='block' device='disk'>"), "{out}");
        assert!(out.contains("<driver name='qemu' type='qcow2'/>"), "{out}");
        assert!(out.contains("<source dev='/dev/loop7'/>"), "{out}");
        // What vsnap reads back is the record.
        let back = parse_domain_xml(&out).unwrap();
        assert_eq!(back.disks, d.disks);
    }

    #[test]
    fn a_monitor_from_the_command_line_is_added_to_the_metadata() {
        let mut d = rec();
        d.qmp = Some(PathBuf::from("/run/vm1.qmp"));
        let out = rewrite(DOC, &d).unwrap();
        assert_eq!(out.matches("<metadata>").count(), 1, "{out}");
        assert_eq!(parse_domain_xml(&out).unwrap().qmp, d.qmp);
        assert!(out.contains("gold &amp; silver"), "{out}");
        // Without <metadata>: one is added; a given <vsnap:qmp> is updated.
        let bare = DOC.replace(
            "  <metadata>\n    <app:tag xmlns:app=\"https://example.org/app\">gold &amp; silver</app:tag>\n  </metadata>\n",
            "",
        );
        let out = rewrite(&bare, &d).unwrap();
        assert_eq!(parse_domain_xml(&out).unwrap().qmp, d.qmp, "{out}");
        let mut moved = d.clone();
        moved.qmp = Some(PathBuf::from("/run/other.qmp"));
        let again = rewrite(&out, &moved).unwrap();
        assert_eq!(parse_domain_xml(&again).unwrap().qmp, moved.qmp, "{again}");
        assert_eq!(again.matches("</vsnap:qmp>").count(), 1, "{again}");
    }
}
