//! What a domain snapshot asks: the typed request, merged from typed flags
//! and libvirt's `<domainsnapshot>` document (read here, strictly).

use crate::xmltree::{self, Element};
use crate::{EngineError, Result};
use std::path::{Path, PathBuf};

/// What to do with one disk, as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskChoice {
    /// Leave the disk out.
    No,
    /// An internal snapshot (qcow2 only).
    Internal,
    /// The overlay's path (default: `<stem>.<snapshot>.qcow2` beside the image).
    External(Option<PathBuf>),
    /// The clone's path (default: `<stem>.<snapshot>.<ext>` beside the image).
    Reflink(Option<PathBuf>),
    /// The overlay written onto this block device (`<disk type='block'>`
    /// with `<source dev=...>`), which the caller made for it.
    ExternalDevice(PathBuf),
}

/// What to do with the guest's memory, as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryChoice {
    /// No memory: disks only.
    No,
    /// Inside the disks (QEMU's `snapshot-save`).
    Internal,
    /// To this file (QEMU's migration stream).
    External(PathBuf),
}

/// A domain snapshot request: flags, or a `<domainsnapshot>` document.
#[derive(Clone, Debug, Default)]
pub struct DomSnapRequest {
    /// The domain's name.
    pub domain: String,
    /// The snapshot's name (default: the creation time in seconds).
    pub name: Option<String>,
    /// Free text kept with the snapshot.
    pub description: Option<String>,
    /// Require a running guest.
    pub live: bool,
    /// Disks only, no memory.
    pub disk_only: bool,
    /// Freeze the guest's filesystems through its agent around the switch.
    pub quiesce: bool,
    /// What to do with the guest's memory (default: see
    /// `plan_domain_snapshot`).
    pub memory: Option<MemoryChoice>,
    /// Per-disk choices, by target or source path.
    pub disks: Vec<(String, DiskChoice)>,
    /// Do not record the snapshot in the catalog (the disks still switch).
    pub no_metadata: bool,
    /// The overlays exist already (made by the caller, backed by the images).
    pub reuse_external: bool,
    /// Shut the guest off after the snapshot.
    pub halt: bool,
}

/// What a caller asks besides (or instead of) a `<domainsnapshot>`
/// document: the command line's flags, typed. Each field left at its
/// default leaves the document's choice (or vsnap's default) alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomSnapFlags {
    /// The snapshot's name; wins over the document's `<name>`.
    pub name: Option<String>,
    /// Wins over the document's `<description>`.
    pub description: Option<String>,
    /// Require a running guest.
    pub live: bool,
    /// Disks only, no memory.
    pub disk_only: bool,
    /// Freeze the guest's filesystems through its agent around the switch.
    pub quiesce: bool,
    /// Wins over the document's `<memory>`. `MemoryChoice::No` means
    /// disk-only (vsnap's `--memory no`).
    pub memory: Option<MemoryChoice>,
    /// Per-disk choices, by target or source path; each replaces what the
    /// document asked for the same name. Given twice, the last one counts.
    pub disks: Vec<(String, DiskChoice)>,
    /// Do not record the snapshot in the catalog.
    pub no_metadata: bool,
    /// The overlays exist already.
    pub reuse_external: bool,
    /// Shut the guest off after the snapshot.
    pub halt: bool,
}

impl DomSnapRequest {
    /// The request for `domain`: the `<domainsnapshot>` document `xml`, if
    /// any, read with [`parse_domainsnapshot`], merged with `flags`, which
    /// win: a name, description or memory choice given in `flags` replaces
    /// the document's; a disk named in `flags.disks` replaces the
    /// document's choice for that disk (by the same name); the booleans
    /// are or-ed with the document's (which has none of its own).
    /// `MemoryChoice::No` sets `disk_only`, and a disk-only request asks
    /// no memory choice.
    ///
    /// Needs nothing but the text: it reads no catalog and no file, and
    /// changes nothing. Fails only when `xml` is not a `<domainsnapshot>`
    /// vsnap accepts ([`EngineError::Xml`], saying why). Whether the domain, its disks
    /// and the choices exist and fit is checked by
    /// [`Engine::plan_domain_snapshot`](crate::Engine::plan_domain_snapshot), not here.
    pub fn new(domain: &str, xml: Option<&str>, flags: DomSnapFlags) -> Result<DomSnapRequest> {
        let mut req = match xml {
            Some(text) => parse_domainsnapshot(text)?,
            None => DomSnapRequest::default(),
        };
        req.domain = domain.to_string();
        if flags.name.is_some() {
            req.name = flags.name;
        }
        if flags.description.is_some() {
            req.description = flags.description;
        }
        req.live |= flags.live;
        req.disk_only |= flags.disk_only;
        req.quiesce |= flags.quiesce;
        req.no_metadata |= flags.no_metadata;
        req.reuse_external |= flags.reuse_external;
        req.halt |= flags.halt;
        if let Some(m) = flags.memory {
            if m == MemoryChoice::No {
                req.disk_only = true;
            }
            req.memory = Some(m);
        }
        if req.disk_only && req.memory == Some(MemoryChoice::No) {
            req.memory = None;
        }
        for (who, choice) in flags.disks {
            req.disks.retain(|(w, _)| *w != who);
            req.disks.push((who, choice));
        }
        Ok(req)
    }
}

/// Parse libvirt's `<domainsnapshot>` (as virsh writes it) plus the seed's
/// extension: a `<disk>` named by target or source path, carrying a
/// nested `<volsnapshot>` with `<kind>` and `<file>`.
pub fn parse_domainsnapshot(text: &str) -> Result<DomSnapRequest> {
    let root = xmltree::parse(text)?;
    if root.name != "domainsnapshot" {
        return Err(EngineError::Xml(format!(
            "the root element is <{}>; expected <domainsnapshot>",
            root.name
        )));
    }
    const KNOWN: &[&str] = &[
        "name",
        "description",
        "memory",
        "disks",
        "state",
        "parent",
        "creationTime",
        "domain",
        "active",
        "cookie",
        "inactiveDomain",
        "inactivedomain",
    ];
    if let Some(u) = root
        .children
        .iter()
        .find(|c| !KNOWN.contains(&c.name.as_str()))
    {
        return Err(EngineError::Xml(format!(
            "unknown element <{}> in <domainsnapshot>; allowed: {}",
            u.name,
            KNOWN.join(", ")
        )));
    }
    root.only_one(&["name", "description", "memory", "disks"])?;
    if root.child_text("name").is_some_and(|n| n.is_empty()) {
        return Err(EngineError::Xml(
            "<name> is empty; give a name, or leave <name> out for the default (the creation time)"
                .into(),
        ));
    }
    let mut r = DomSnapRequest {
        name: root.child_text("name"),
        description: root.child_text("description"),
        ..Default::default()
    };
    if let Some(m) = root.child("memory") {
        r.memory = parse_memory(m)?;
    }
    if let Some(disks) = root.child("disks") {
        disks.only_known("<disks>", &[], &["disk"])?;
        let mut seen = std::collections::BTreeSet::new();
        for d in disks.children_named("disk") {
            let (name, choice) = parse_snapshot_disk(d)?;
            if !seen.insert(name.clone()) {
                return Err(EngineError::Xml(format!(
                    "disk '{name}' is named twice in <disks>; give each disk once"
                )));
            }
            if let Some(choice) = choice {
                r.disks.push((name, choice));
            }
        }
    }
    Ok(r)
}

/// `<memory>` of a `<domainsnapshot>`, by libvirt's rules: a `file`
/// without `snapshot=` means an external memory snapshot; a file with
/// `snapshot='no'` or `'internal'` is a contradiction; the file's path is
/// absolute. No `snapshot=` and no file: the default (`None`).
fn parse_memory(m: &Element) -> Result<Option<MemoryChoice>> {
    m.only_known("<memory>", &["snapshot", "file"], &[])?;
    let file = m.attr("file");
    let choice = match (m.attr("snapshot"), file) {
        (None, None) => return Ok(None),
        (None | Some("external"), Some(f)) => {
            if !Path::new(f).is_absolute() {
                return Err(EngineError::Xml(format!(
                    "<memory file='{f}'>: the memory file's path must be absolute (libvirt's rule)"
                )));
            }
            MemoryChoice::External(PathBuf::from(f))
        }
        (Some("external"), None) => {
            return Err(EngineError::Xml(
                "<memory snapshot='external'> needs file='PATH' (an absolute path)".into(),
            ))
        }
        (Some(mode @ ("no" | "internal")), Some(f)) => {
            return Err(EngineError::Xml(format!(
                "<memory snapshot='{mode}' file='{f}'> contradicts itself: a memory file needs \
                 snapshot='external' (or no snapshot= at all); drop file= for '{mode}'"
            )))
        }
        (Some("no"), None) => MemoryChoice::No,
        (Some("internal"), None) => MemoryChoice::Internal,
        (Some("manual"), _) => {
            return Err(EngineError::Xml(
                "<memory snapshot='manual'>: a 'manual' memory snapshot is not supported (nor by libvirt); \
                 use no, internal or external"
                    .into(),
            ))
        }
        (Some(other), _) => {
            return Err(EngineError::Xml(format!(
                "<memory snapshot='{other}'>: expected no, internal or external"
            )))
        }
    };
    Ok(Some(choice))
}

/// One `<disk>` of `<disks>`: its name and what is asked for it (`None`:
/// the default). libvirt's rules: a `<source>` or `<driver>` without
/// `snapshot=` means external; a source file needs external mode and an
/// absolute path. What vsnap cannot do exactly is refused: overlays that
/// are not local qcow2 files, `snapshot='manual'`, attributes and elements
/// vsnap does not act on.
fn parse_snapshot_disk(d: &Element) -> Result<(String, Option<DiskChoice>)> {
    let name = d
        .attr("name")
        .ok_or_else(|| EngineError::Xml("a <disk> in <disks> has no name='...'".into()))?
        .to_string();
    let what = format!("<disk name='{name}'>");
    d.only_known(
        &what,
        &["name", "snapshot", "type"],
        &["source", "driver", "volsnapshot"],
    )?;
    d.only_one(&["source", "driver", "volsnapshot"])?;
    let block = match d.attr("type").unwrap_or("file") {
        "file" => false,
        "block" => true,
        "network" => {
            return Err(EngineError::Xml(format!(
                "{what}: type='network' (an overlay on rbd, gluster, nbd, iscsi...) is not something vsnap can make: \
                 it writes qcow2 overlays to local files; give <source file='/absolute/path'/>, or leave the disk \
                 out with snapshot='no' (--disk {name}=no)"
            )))
        }
        t @ ("volume" | "dir") => {
            return Err(EngineError::Xml(format!(
                "{what}: type='{t}' is not a disk snapshot type (libvirt refuses it too); use type='file'"
            )))
        }
        t => {
            return Err(EngineError::Xml(format!(
                "{what}: unknown type='{t}'; use type='file' (the default)"
            )))
        }
    };
    // type='block': the overlay goes onto the device `<source dev=...>`.
    let (attr, hint) = if block {
        (
            "dev",
            "dev='/dev/...' (the device the overlay is written onto)",
        )
    } else {
        ("file", "file='PATH'")
    };
    let mut file = match d.child("source") {
        Some(src) => {
            src.only_known(&format!("{what} <source>"), &[attr], &[])?;
            Some(PathBuf::from(src.attr(attr).ok_or_else(|| {
                EngineError::Xml(format!("{what}: <source> needs {hint}"))
            })?))
        }
        None if block => {
            return Err(EngineError::Xml(format!(
                "{what}: type='block' needs <source {hint}/>"
            )))
        }
        None => None,
    };
    let driver = match d.child("driver") {
        Some(dr) => {
            dr.only_known(&format!("{what} <driver>"), &["type"], &[])?;
            match dr.attr("type") {
                Some("qcow2") => true,
                Some("raw") => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver type='raw'>: an overlay cannot be raw (it needs a backing file; \
                         libvirt refuses it too); vsnap writes qcow2 overlays: drop <driver> or say qcow2"
                    )))
                }
                Some(t) => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver type='{t}'>: vsnap writes qcow2 overlays only; drop <driver> or say qcow2"
                    )))
                }
                None => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver> without type=; say <driver type='qcow2'/> or drop it"
                    )))
                }
            }
        }
        None => false,
    };
    let mut kind = d.attr("snapshot").map(str::to_string);
    if let Some(v) = d.child("volsnapshot") {
        v.only_known(&format!("{what} <volsnapshot>"), &[], &["kind", "file"])?;
        v.only_one(&["kind", "file"])?;
        if let Some(k) = v.child_text("kind") {
            kind = Some(k);
        }
        if let Some(f) = v.child_text("file") {
            file = Some(PathBuf::from(f));
        }
    }
    if let Some(f) = &file {
        if !f.is_absolute() {
            return Err(EngineError::Xml(format!(
                "{what}: the snapshot file {} must be an absolute path (libvirt's rule)",
                f.display()
            )));
        }
    }
    let kind = kind.unwrap_or_else(|| {
        if file.is_some() || driver {
            "external".into()
        } else {
            "default".into()
        }
    });
    if let Some(f) = &file {
        if kind != "external" && kind != "reflink" {
            return Err(EngineError::Xml(format!(
                "{what}: the file {} needs snapshot='external' (a '{kind}' snapshot makes no file); \
                 drop the <source> or make it external",
                f.display()
            )));
        }
    }
    if driver && kind != "external" {
        return Err(EngineError::Xml(format!(
            "{what}: <driver type='qcow2'> is the format of an external overlay; a '{kind}' snapshot has none: drop <driver>"
        )));
    }
    if block && (kind != "external" || d.child("volsnapshot").is_some()) {
        return Err(EngineError::Xml(format!(
            "{what}: type='block' is an external overlay written onto a device; snapshot='{kind}' (or a \
             nested <volsnapshot>) does not go with it"
        )));
    }
    let choice = match kind.as_str() {
        "no" => DiskChoice::No,
        "internal" => DiskChoice::Internal,
        "external" if block => DiskChoice::ExternalDevice(file.expect("a block target has its device")),
        "external" => DiskChoice::External(file),
        "reflink" => DiskChoice::Reflink(file),
        "default" => return Ok((name, None)),
        "manual" => {
            return Err(EngineError::Xml(format!(
                "{what}: snapshot='manual' (the disk left to you while the guest is paused) is not something \
                 vsnap does; use no, internal or external (or a nested <volsnapshot><kind>reflink</kind></volsnapshot>)"
            )))
        }
        other => {
            return Err(EngineError::Xml(format!(
                "{what}: snapshot='{other}': expected no, internal or external \
                 (or a nested <volsnapshot><kind>reflink</kind></volsnapshot>)"
            )))
        }
    };
    Ok((name, Some(choice)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_or_empty_elements_are_refused() {
        for (bad, says) in [
            ("<domainsnapshot><name>a</name><name>b</name></domainsnapshot>", "more than one <name>"),
            ("<domainsnapshot><name></name></domainsnapshot>", "<name> is empty"),
            (
                "<domainsnapshot><disks><disk name='vda'><source file='/a'/><source file='/b'/></disk></disks></domainsnapshot>",
                "more than one <source>",
            ),
            (
                "<domainsnapshot><disks><disk name='vda'><volsnapshot><kind>reflink</kind><kind>no</kind></volsnapshot></disk></disks></domainsnapshot>",
                "more than one <kind>",
            ),
        ] {
            let e = parse_domainsnapshot(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let r = parse_domainsnapshot("<domainsnapshot><name>s<!-- -->1</name></domainsnapshot>")
            .unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
    }

    #[test]
    fn accepts_libvirt_snapshot_xml() {
        let r = parse_domainsnapshot(
            "<domainsnapshot><name>s1</name><description>d</description><memory snapshot='no'/>\
             <disks><disk name='vda' snapshot='external'><driver type='qcow2'/><source file='/o/a.qcow2'/></disk>\
             <disk name='vdb' snapshot='no'/><disk name='/vm/c.qcow2'><volsnapshot><kind>internal</kind></volsnapshot></disk></disks>\
             <state>disk-snapshot</state><creationTime>1</creationTime></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
        assert_eq!(r.memory, Some(MemoryChoice::No));
        assert_eq!(
            r.disks[0],
            (
                "vda".into(),
                DiskChoice::External(Some("/o/a.qcow2".into()))
            )
        );
        assert_eq!(r.disks[1], ("vdb".into(), DiskChoice::No));
        assert_eq!(r.disks[2], ("/vm/c.qcow2".into(), DiskChoice::Internal));
    }

    /// libvirt's `<domainsnapshot>` rules (formatsnapshot), a document
    /// each: what vsnap reads, or the words of its refusal.
    #[test]
    fn domainsnapshot_documents_are_read_as_libvirt_reads_them_or_refused() {
        fn doc(inner: &str) -> String {
            format!("<domainsnapshot><name>s</name>{inner}</domainsnapshot>")
        }
        let ext = |p: &str| DiskChoice::External(Some(PathBuf::from(p)));
        // Read: (document, memory, disks)
        type Read<'a> = (&'a str, Option<MemoryChoice>, Vec<(&'a str, DiskChoice)>);
        let read: &[Read] = &[
            ("", None, vec![]),
            // a memory file without snapshot= is an external memory snapshot
            ("<memory file='/vm/m.mem'/>", Some(MemoryChoice::External("/vm/m.mem".into())), vec![]),
            ("<memory snapshot='external' file='/vm/m.mem'/>", Some(MemoryChoice::External("/vm/m.mem".into())), vec![]),
            ("<memory snapshot='no'/>", Some(MemoryChoice::No), vec![]),
            ("<memory snapshot='internal'/>", Some(MemoryChoice::Internal), vec![]),
            ("<memory/>", None, vec![]),
            // a <source> or a <driver> without snapshot= means external
            ("<disks><disk name='vda'><source file='/o/a.qcow2'/></disk></disks>", None, vec![("vda", ext("/o/a.qcow2"))]),
            ("<disks><disk name='vda'><driver type='qcow2'/></disk></disks>", None, vec![("vda", DiskChoice::External(None))]),
            (
                "<disks><disk name='vda' snapshot='external' type='file'><driver type='qcow2'/><source file='/o/a.qcow2'/></disk></disks>",
                None,
                vec![("vda", ext("/o/a.qcow2"))],
            ),
            ("<disks><disk name='vda'/></disks>", None, vec![]),
            ("<disks><disk name='vda' snapshot='no'/><disk name='vdb' snapshot='internal'/></disks>", None,
             vec![("vda", DiskChoice::No), ("vdb", DiskChoice::Internal)]),
            (
                "<disks><disk name='vdb' snapshot='manual'><volsnapshot><kind>reflink</kind><file>/vm/b.r.raw</file></volsnapshot></disk></disks>",
                None,
                vec![("vdb", DiskChoice::Reflink(Some("/vm/b.r.raw".into())))],
            ),
            // an overlay written onto a block device (libvirt's type='block')
            (
                "<disks><disk name='vda' snapshot='external' type='block'><driver type='qcow2'/><source dev='/dev/sdz'/></disk></disks>",
                None,
                vec![("vda", DiskChoice::ExternalDevice("/dev/sdz".into()))],
            ),
            ("<disks><disk name='vda' type='block'><source dev='/dev/sdz'/></disk></disks>", None,
             vec![("vda", DiskChoice::ExternalDevice("/dev/sdz".into()))]),
            // output-only elements of libvirt's own dumpxml are ignored on create, as libvirt does
            ("<state>running</state><creationTime>5</creationTime><parent><name>p</name></parent><active>1</active>", None, vec![]),
        ];
        for (inner, memory, disks) in read {
            let r = parse_domainsnapshot(&doc(inner)).unwrap_or_else(|e| panic!("{inner}: {e}"));
            assert_eq!(&r.memory, memory, "{inner}");
            let want: Vec<(String, DiskChoice)> = disks
                .iter()
                .map(|(n, c)| (n.to_string(), c.clone()))
                .collect();
            assert_eq!(r.disks, want, "{inner}");
        }
        // Refused: (document, words of the error)
        let refused: &[(&str, &[&str])] = &[
            ("<memory snapshot='no' file='/vm/m.mem'/>", &["contradicts", "snapshot='external'"]),
            ("<memory snapshot='internal' file='/vm/m.mem'/>", &["contradicts"]),
            ("<memory snapshot='external'/>", &["needs file="]),
            ("<memory snapshot='manual'/>", &["'manual' memory snapshot is not supported"]),
            ("<memory file='m.mem'/>", &["m.mem", "must be absolute"]),
            ("<memory snapshot='external' file='/m' colour='red'/>", &["colour", "not something vsnap acts on"]),
            ("<disks><disk name='vda' snapshot='no'/><disk name='vda' snapshot='external'/></disks>", &["disk 'vda' is named twice"]),
            ("<disks><disk name='vda' snapshot='internal'><source file='/o/a.qcow2'/></disk></disks>", &["/o/a.qcow2", "needs snapshot='external'"]),
            ("<disks><disk name='vda' snapshot='no'><source file='/o/a.qcow2'/></disk></disks>", &["needs snapshot='external'"]),
            ("<disks><disk name='vda'><source file='a.qcow2'/></disk></disks>", &["a.qcow2", "must be an absolute path"]),
            ("<disks><disk name='vda'><driver type='raw'/><source file='/o/a.raw'/></disk></disks>", &["type='raw'", "cannot be raw"]),
            ("<disks><disk name='vda'><driver type='qed'/><source file='/o/a.qed'/></disk></disks>", &["type='qed'", "qcow2 overlays only"]),
            ("<disks><disk name='vda' snapshot='internal'><driver type='qcow2'/></disk></disks>", &["drop <driver>"]),
            ("<disks><disk name='vda' snapshot='manual'/></disks>", &["snapshot='manual'", "no, internal or external"]),
            ("<disks><disk name='vda' snapshot='external' type='network'><source protocol='rbd' name='pool/a'><host name='h'/></source></disk></disks>",
             &["<disk name='vda'>", "type='network'", "snapshot='no'"]),
            ("<disks><disk name='vda' type='block'/></disks>", &["type='block' needs <source dev="]),
            ("<disks><disk name='vda' type='block'><source file='/o/a'/></disk></disks>", &["file=", "not something vsnap acts on"]),
            ("<disks><disk name='vda' snapshot='internal' type='block'><source dev='/dev/sdz'/></disk></disks>", &["needs snapshot='external'"]),
            ("<disks><disk name='vda' type='block'><source dev='sdz'/></disk></disks>", &["must be an absolute path"]),
            ("<disks><disk name='vda' type='volume'/></disks>", &["type='volume'"]),
            ("<disks><disk name='vda'><source file='/o/a.qcow2' startupPolicy='optional'/></disk></disks>", &["startupPolicy", "not something vsnap acts on"]),
            ("<disks><disk name='vda'><source dev='/dev/sdz'/></disk></disks>", &["dev=", "not something vsnap acts on"]),
            ("<disks><disk name='vda'><source file='/o/a.qcow2'><seclabel/></source></disk></disks>", &["<seclabel>"]),
            ("<disks><disk name='vda' persistent='yes'/></disks>", &["persistent"]),
            ("<disks><disk name='vda'><target dev='vda'/></disk></disks>", &["<target>"]),
            ("<disks><disk name='vda'><driver type='qcow2'><metadata_cache/></driver></disk></disks>", &["<metadata_cache>"]),
            ("<disks><volume name='x'/></disks>", &["<volume>"]),
        ];
        for (inner, words) in refused {
            let e = parse_domainsnapshot(&doc(inner))
                .map(|r| format!("accepted: {r:?}"))
                .unwrap_or_else(|e| e.to_string());
            for w in *words {
                assert!(e.contains(w), "{inner}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn names_an_unknown_element() {
        let e = parse_domainsnapshot("<domainsnapshot><colour/></domainsnapshot>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("<colour>"), "{e}");
    }

    const MERGE_XML: &str = "<domainsnapshot><name>x</name><description>from xml</description>\
        <memory snapshot='external' file='/m/mem'/>\
        <disks><disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='no'/></disks>\
        </domainsnapshot>";

    #[test]
    fn request_new_without_xml_is_the_flags() {
        let r = DomSnapRequest::new(
            "d",
            None,
            DomSnapFlags {
                name: Some("s".into()),
                live: true,
                quiesce: true,
                halt: true,
                disks: vec![("vda".into(), DiskChoice::External(None))],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.name.as_deref(), Some("s"));
        assert!(r.live && r.quiesce && r.halt);
        assert!(!r.disk_only && !r.no_metadata && !r.reuse_external);
        assert_eq!(r.memory, None);
        assert_eq!(r.disks, vec![("vda".into(), DiskChoice::External(None))]);
    }

    #[test]
    fn request_new_flags_win_over_xml() {
        // Nothing given: the document's choices stand.
        let r = DomSnapRequest::new("d", Some(MERGE_XML), DomSnapFlags::default()).unwrap();
        assert_eq!(r.name.as_deref(), Some("x"));
        assert_eq!(r.description.as_deref(), Some("from xml"));
        assert_eq!(r.memory, Some(MemoryChoice::External("/m/mem".into())));
        assert_eq!(
            r.disks,
            vec![
                ("vda".into(), DiskChoice::Internal),
                ("vdb".into(), DiskChoice::No)
            ]
        );
        // Given: the flags win.
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                name: Some("y".into()),
                description: Some("from flags".into()),
                memory: Some(MemoryChoice::Internal),
                no_metadata: true,
                reuse_external: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.name.as_deref(), Some("y"));
        assert_eq!(r.description.as_deref(), Some("from flags"));
        assert_eq!(r.memory, Some(MemoryChoice::Internal));
        assert!(r.no_metadata && r.reuse_external && !r.disk_only);
    }

    #[test]
    fn request_new_memory_no_is_disk_only() {
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                memory: Some(MemoryChoice::No),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.disk_only);
        assert_eq!(r.memory, None);
        // --disk-only alone keeps the document's memory choice for the
        // planner to judge; with the document's snapshot='no' it is dropped.
        let r = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><memory snapshot='no'/></domainsnapshot>"),
            DomSnapFlags {
                disk_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.disk_only);
        assert_eq!(r.memory, None);
        // The document's snapshot='no' alone does not make it disk-only.
        let r = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><memory snapshot='no'/></domainsnapshot>"),
            DomSnapFlags::default(),
        )
        .unwrap();
        assert!(!r.disk_only);
        assert_eq!(r.memory, Some(MemoryChoice::No));
    }

    #[test]
    fn request_new_disk_flag_replaces_the_xml_choice() {
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                disks: vec![
                    (
                        "vdb".into(),
                        DiskChoice::External(Some("/o/b.qcow2".into())),
                    ),
                    ("vdc".into(), DiskChoice::Internal),
                    ("vdc".into(), DiskChoice::No),
                ],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            r.disks,
            vec![
                ("vda".into(), DiskChoice::Internal),
                (
                    "vdb".into(),
                    DiskChoice::External(Some("/o/b.qcow2".into()))
                ),
                ("vdc".into(), DiskChoice::No),
            ]
        );
    }

    #[test]
    fn request_new_refuses_a_bad_document() {
        let e = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><colour/></domainsnapshot>"),
            DomSnapFlags {
                name: Some("s".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, EngineError::Xml(_)), "{e}");
    }
}
