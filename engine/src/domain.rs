//! Domains: a guest's name, its disks (target -> active image), and, when
//! it runs, its QMP socket and guest-agent socket. Defined from a subset of
//! libvirt's `<domain>` XML (so `virsh dumpxml` output is accepted as it
//! is), or attached to a running QEMU by its monitor.
//!
//! The QMP socket comes from `--qmp` or our metadata element:
//! `<metadata><vsnap:qmp xmlns:vsnap="https://vsnap.dev/xmlns/domain/1">/run/vm.qmp</vsnap:qmp></metadata>`.
//! The agent socket is the unix `<channel>` whose target is
//! `org.qemu.guest_agent.0`.

use crate::xmltree::{self, esc, Element};
use crate::{validate_name_of, Engine, EngineError, NameKind, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use vsnap_journal::{codec, CatalogOp};
use vsnap_steps::{live, Format, StepError};

pub const DOMAINS: &str = "domains";
/// The XML namespace of vsnap's `<metadata>` element.
pub const XMLNS: &str = "https://vsnap.dev/xmlns/domain/1";
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// One disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomDisk {
    /// `vda`, or the name QEMU reports (drive id, or device id with `-blockdev`).
    pub target: String,
    /// The active image now (after an external snapshot: the overlay).
    #[serde(with = "vsnap_steps::pathser")]
    pub source: PathBuf,
    pub format: Format,
    pub readonly: bool,
    pub shareable: bool,
}

/// A domain as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRec {
    pub name: String,
    pub uuid: Option<String>,
    pub disks: Vec<DomDisk>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub qmp: Option<PathBuf>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub agent: Option<PathBuf>,
    /// The current snapshot.
    pub current: Option<String>,
    pub next_seq: u64,
}

impl DomainRec {
    pub fn disk(&self, target_or_path: &str) -> Option<&DomDisk> {
        self.disks
            .iter()
            .find(|d| d.target == target_or_path || d.source == Path::new(target_or_path))
    }
}

/// What QEMU says of a domain now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomState {
    Running,
    Paused,
    /// No QEMU answers on the monitor (or none is configured).
    Shutoff,
}

impl DomState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomState::Running => "running",
            DomState::Paused => "paused",
            DomState::Shutoff => "shutoff",
        }
    }
}

pub fn put_domain(d: &DomainRec) -> CatalogOp {
    CatalogOp::Put {
        tree: DOMAINS.into(),
        key: d.name.as_bytes().to_vec(),
        value: codec::encode(d),
    }
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Journal(vsnap_journal::JournalError::CorruptCatalog {
        tree: DOMAINS.into(),
        key: key.into(),
        reason: e.to_string(),
    })
}

fn parse_format(s: &str, what: &str) -> Result<Format> {
    Format::parse(s).ok_or_else(|| {
        EngineError::Invalid(format!(
            "{what}: format {s:?} is not supported; vsnap handles qcow2 and raw images"
        ))
    })
}

/// Parse the `<domain>` subset. Unknown elements are left alone.
pub fn parse_domain_xml(text: &str) -> Result<DomainRec> {
    Ok(parse_domain_xml_typed(text)?.0)
}

/// [`parse_domain_xml`], and for each disk whether the XML says it is a
/// block device (`<disk type='block'>` or `<source dev=...>`).
fn parse_domain_xml_typed(text: &str) -> Result<(DomainRec, Vec<bool>)> {
    let mut blocks = Vec::new();
    let root = xmltree::parse(text)?;
    if root.name != "domain" {
        return Err(EngineError::Xml(format!(
            "the root element is <{}>; expected <domain>",
            root.name
        )));
    }
    root.only_one(&["name", "uuid", "devices", "metadata"])?;
    let name = root
        .child_text("name")
        .ok_or_else(|| EngineError::Xml("<domain> has no <name>".into()))?;
    validate_name_of(NameKind::Domain, &name)?;
    let mut d = DomainRec {
        name,
        uuid: root.child_text("uuid"),
        disks: Vec::new(),
        qmp: None,
        agent: None,
        current: None,
        next_seq: 0,
    };
    if let Some(devices) = root.child("devices") {
        for disk in devices.children_named("disk") {
            let device = disk.attr("device").unwrap_or("disk");
            if device != "disk" {
                continue; // cdrom, floppy: nothing to snapshot
            }
            d.disks.push(parse_disk(disk)?);
            blocks.push(
                disk.attr("type") == Some("block")
                    || disk.child("source").and_then(|s| s.attr("dev")).is_some(),
            );
        }
        for ch in devices.children_named("channel") {
            ch.only_one(&["target", "source"])?;
            let target = ch.child("target").and_then(|t| t.attr("name"));
            if ch.attr("type") == Some("unix") && target == Some(AGENT_CHANNEL) {
                d.agent = ch
                    .child("source")
                    .and_then(|s| s.attr("path"))
                    .map(PathBuf::from);
            }
        }
    }
    if let Some(meta) = root.child("metadata") {
        meta.only_one(&["qmp"])?;
        if let Some(q) = meta.children.iter().find(|c| c.name == "qmp") {
            d.qmp = Some(PathBuf::from(q.text.trim()));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for disk in &d.disks {
        if !seen.insert(disk.target.clone()) {
            return Err(EngineError::Xml(format!(
                "two disks have target {:?}",
                disk.target
            )));
        }
    }
    Ok((d, blocks))
}

fn parse_disk(disk: &Element) -> Result<DomDisk> {
    disk.only_one(&["target", "source", "driver"])?;
    let target = disk
        .child("target")
        .and_then(|t| t.attr("dev"))
        .ok_or_else(|| EngineError::Xml("a <disk> has no <target dev=...>".into()))?
        .to_string();
    if target
        .chars()
        .any(|c| c.is_control() || crate::is_invisible(c))
    {
        return Err(EngineError::Xml(format!(
            "disk target {target:?} holds a control or invisible (format) character; name it as libvirt does (vda, sdb, ...)"
        )));
    }
    let src = disk.child("source");
    let source = src
        .and_then(|s| s.attr("file").or_else(|| s.attr("dev")))
        .ok_or_else(|| {
            EngineError::Xml(format!(
                "disk {target}: no <source file=...> or <source dev=...>"
            ))
        })?;
    let source = PathBuf::from(source);
    let format = match disk.child("driver").and_then(|d| d.attr("type")) {
        Some(t) => parse_format(t, &format!("disk {target}"))?,
        // libvirt's own default without format probing (which libvirt
        // leaves off): raw. Never guessed from the image's bytes, which a
        // guest writes (see image.rs).
        None => Format::Raw,
    };
    Ok(DomDisk {
        target,
        source,
        format,
        readonly: disk.child("readonly").is_some(),
        shareable: disk.child("shareable").is_some(),
    })
}

/// The `<domain>` subset vsnap keeps, as libvirt writes it.
pub fn domain_to_xml(d: &DomainRec) -> String {
    let mut x = String::from("<domain type='kvm'>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&d.name)));
    if let Some(u) = &d.uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", esc(u)));
    }
    if let Some(q) = &d.qmp {
        x.push_str(&format!(
            "  <metadata>\n    <vsnap:qmp xmlns:vsnap='{XMLNS}'>{}</vsnap:qmp>\n  </metadata>\n",
            esc(&q.to_string_lossy())
        ));
    }
    x.push_str("  <devices>\n");
    for disk in &d.disks {
        use std::os::unix::fs::FileTypeExt;
        let block = std::fs::metadata(&disk.source).is_ok_and(|m| m.file_type().is_block_device());
        let (ty, attr) = if block {
            ("block", "dev")
        } else {
            ("file", "file")
        };
        x.push_str(&format!("    <disk type='{ty}' device='disk'>\n"));
        x.push_str(&format!(
            "      <driver name='qemu' type='{}'/>\n",
            disk.format
        ));
        x.push_str(&format!(
            "      <source {attr}='{}'/>\n",
            esc(&disk.source.to_string_lossy())
        ));
        x.push_str(&format!("      <target dev='{}'/>\n", esc(&disk.target)));
        if disk.readonly {
            x.push_str("      <readonly/>\n");
        }
        if disk.shareable {
            x.push_str("      <shareable/>\n");
        }
        x.push_str("    </disk>\n");
    }
    if let Some(a) = &d.agent {
        x.push_str(&format!(
            "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      <target type='virtio' name='{AGENT_CHANNEL}'/>\n    </channel>\n",
            esc(&a.to_string_lossy())
        ));
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// The name QEMU's `query-block` gives a device: `device`, else the
/// peripheral id inside `qdev` (`/machine/peripheral/vda/virtio-backend`).
pub fn block_target(entry: &Value) -> Option<String> {
    let dev = entry.get("device").and_then(Value::as_str).unwrap_or("");
    if !dev.is_empty() {
        return Some(dev.to_string());
    }
    let qdev = entry.get("qdev").and_then(Value::as_str)?;
    match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().map(str::to_string),
        None => Some(qdev.to_string()),
    }
}

/// The key [`vsnap_steps::live::block_entry`] matches on.
pub fn block_key(entry: &Value) -> String {
    let dev = entry.get("device").and_then(Value::as_str).unwrap_or("");
    if dev.is_empty() {
        entry
            .get("qdev")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        dev.to_string()
    }
}

/// A path as given, made absolute against the current directory (sockets
/// and images are used later from any directory).
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p)
        .map_err(|e| EngineError::Invalid(format!("cannot make {} absolute: {e}", p.display())))
}

impl Engine {
    /// A domain by name.
    pub fn domain(&self, name: &str) -> Result<DomainRec> {
        match self.journal().catalog_get(DOMAINS, name.as_bytes())? {
            None => Err(EngineError::Invalid(format!(
                "no domain named {name:?}; `vsnap domain list` lists them, `vsnap domain define` adds one"
            ))),
            Some(b) => codec::decode(&b).map_err(|e| corrupt(name, e)),
        }
    }

    pub fn domain_list(&self) -> Result<Vec<DomainRec>> {
        let mut out = Vec::new();
        for (k, v) in self.journal().catalog_scan(DOMAINS, b"")? {
            out.push(codec::decode(&v).map_err(|e| corrupt(&String::from_utf8_lossy(&k), e))?);
        }
        Ok(out)
    }

    fn domain_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .journal()
            .catalog_get(DOMAINS, name.as_bytes())?
            .is_some())
    }

    /// Define a domain from `<domain>` XML; `qmp` overrides the metadata.
    pub fn domain_define(&self, xml: &str, qmp: Option<PathBuf>) -> Result<DomainRec> {
        let _g = self.lock_ops();
        let (mut d, blocks) = parse_domain_xml_typed(xml)?;
        if qmp.is_some() {
            d.qmp = qmp;
        }
        d.qmp = d.qmp.as_deref().map(absolute).transpose()?;
        d.agent = d.agent.as_deref().map(absolute).transpose()?;
        for disk in &mut d.disks {
            disk.source = absolute(&disk.source)?;
        }
        if self.domain_exists(&d.name)? {
            return Err(EngineError::Invalid(format!(
                "domain {:?} is already defined; `vsnap domain undefine {}` first",
                d.name, d.name
            )));
        }
        let mut ids: Vec<((u64, u64), &str)> = Vec::new();
        for (disk, &block) in d.disks.iter().zip(&blocks) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let meta = std::fs::metadata(&disk.source).map_err(|_| {
                EngineError::Invalid(format!(
                    "disk {}: source {} does not exist; fix the <source> in the XML",
                    disk.target,
                    disk.source.display()
                ))
            })?;
            let ft = meta.file_type();
            let what = crate::file_type_name(&ft);
            if block && !ft.is_block_device() {
                return Err(EngineError::Invalid(format!(
                    "disk {}: <disk type='block'> names {}, which is {what}, not a block device; fix the <disk> in the XML",
                    disk.target,
                    disk.source.display()
                )));
            }
            if !block && !ft.is_file() {
                return Err(EngineError::Invalid(format!(
                    "disk {}: source {} is {what}, not a disk image file; a <disk type='file'> names an image file (a block device is <disk type='block'> with <source dev=...>)",
                    disk.target,
                    disk.source.display()
                )));
            }
            let id = (meta.dev(), meta.ino());
            if let Some((_, other)) = ids.iter().find(|(i, _)| *i == id) {
                return Err(EngineError::Invalid(format!(
                    "disks {other} and {} both name the image {} (one image for two disks); give each disk its own image",
                    disk.target,
                    disk.source.display()
                )));
            }
            ids.push((id, &disk.target));
            // A loop or an over-deep chain is refused now, not found by
            // the first qemu-img that opens it.
            vsnap_steps::qemu_img::backing_chain(&disk.source, disk.format)
                .map_err(|e| EngineError::Invalid(format!("disk {}: {e}", disk.target)))?;
        }
        self.journal().catalog_apply(&[put_domain(&d)])?;
        Ok(d)
    }

    /// Define a domain from a running QEMU: its disks are what
    /// `query-block` reports.
    pub fn domain_attach(&self, name: &str, qmp: &Path, agent: Option<&Path>) -> Result<DomainRec> {
        let _g = self.lock_ops();
        validate_name_of(NameKind::Domain, name)?;
        if self.domain_exists(name)? {
            return Err(EngineError::Invalid(format!(
                "domain {name:?} is already defined; `vsnap domain undefine {name}` first"
            )));
        }
        let mut q = live::qmp(qmp).map_err(EngineError::Check)?;
        let blocks = q.query_block().map_err(EngineError::Check)?;
        let mut disks = Vec::new();
        for b in blocks.as_array().into_iter().flatten() {
            let Some(ins) = b.get("inserted") else {
                continue;
            };
            let target = block_target(b).unwrap_or_default();
            let file = ins.get("file").and_then(Value::as_str).unwrap_or("");
            if file.is_empty() || file.starts_with("json:") {
                return Err(EngineError::Invalid(format!(
                    "disk {target}: QEMU names its image {file:?}, not a plain file; define the domain from XML instead"
                )));
            }
            if !Path::new(file).is_absolute() {
                return Err(EngineError::Invalid(format!(
                    "disk {target}: QEMU names its image {file:?}, a relative path (relative to QEMU's own directory); start QEMU with absolute image paths, or define the domain from XML"
                )));
            }
            let drv = ins.get("drv").and_then(Value::as_str).unwrap_or("");
            disks.push(DomDisk {
                target: target.clone(),
                source: PathBuf::from(file),
                format: parse_format(drv, &format!("disk {target}"))?,
                readonly: ins.get("ro").and_then(Value::as_bool).unwrap_or(false),
                shareable: false,
            });
        }
        let d = DomainRec {
            name: name.into(),
            uuid: None,
            disks,
            qmp: Some(absolute(qmp)?),
            agent: agent.map(absolute).transpose()?,
            current: None,
            next_seq: 0,
        };
        self.journal().catalog_apply(&[put_domain(&d)])?;
        Ok(d)
    }

    /// Forget a domain. Refused while it has snapshots, unless
    /// `drop_snapshot_metadata` (the files stay; only the catalog forgets).
    pub fn domain_undefine(&self, name: &str, drop_snapshot_metadata: bool) -> Result<()> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        let snaps = crate::domsnap::snapshots(self.journal(), &d.name)?;
        if !snaps.is_empty() && !drop_snapshot_metadata {
            return Err(EngineError::Invalid(format!(
                "domain {name:?} has {} snapshot(s); pass --snapshots-metadata to forget them too (their files stay)",
                snaps.len()
            )));
        }
        let mut ops = vec![CatalogOp::Delete {
            tree: DOMAINS.into(),
            key: name.as_bytes().to_vec(),
        }];
        ops.extend(
            snaps
                .iter()
                .map(|s| crate::domsnap::delete_snapshot_op(&d.name, &s.name)),
        );
        self.journal().catalog_apply(&ops)?;
        Ok(())
    }

    /// What QEMU says now: running, paused, or shutoff (no monitor answers).
    pub fn domain_state(&self, d: &DomainRec) -> Result<DomState> {
        let Some(qmp) = &d.qmp else {
            return Ok(DomState::Shutoff);
        };
        match live::qmp(qmp) {
            Ok(mut q) => {
                let (running, _) = q.query_status().map_err(EngineError::Check)?;
                Ok(if running {
                    DomState::Running
                } else {
                    DomState::Paused
                })
            }
            Err(StepError::QmpNoSocket { .. } | StepError::QmpConnect { .. }) => {
                Ok(DomState::Shutoff)
            }
            Err(e) => Err(EngineError::Check(e)),
        }
    }

    pub fn domain_xml(&self, name: &str) -> Result<String> {
        Ok(domain_to_xml(&self.domain(name)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIRSH: &str = r#"<domain type='kvm' id='1'>
  <name>vm1</name>
  <uuid>7a3c1f2e-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <metadata>
    <vsnap:qmp xmlns:vsnap="https://vsnap.dev/xmlns/domain/1">/run/vm1.qmp</vsnap:qmp>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vm/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/vm/b.raw'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/run/vm1.qga'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn a_repeated_name_or_disk_source_is_refused() {
        let two_names = VIRSH.replacen("<name>", "<name>other</name><name>", 1);
        let e = parse_domain_xml(&two_names).unwrap_err().to_string();
        assert!(e.contains("<domain> has more than one <name>"), "{e}");
        let two_sources = VIRSH.replacen("<source ", "<source file='/x.qcow2'/><source ", 1);
        let e = parse_domain_xml(&two_sources).unwrap_err().to_string();
        assert!(e.contains("<disk> has more than one <source>"), "{e}");
    }

    #[test]
    fn accepts_virsh_dumpxml_output() {
        let d = parse_domain_xml(VIRSH).unwrap();
        assert_eq!(d.name, "vm1");
        assert_eq!(d.disks.len(), 2, "the cdrom is skipped");
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(d.disks[0].format, Format::Qcow2);
        assert_eq!(d.disks[1].source, PathBuf::from("/vm/b.raw"));
        assert!(d.disks[1].shareable);
        assert_eq!(d.agent, Some(PathBuf::from("/run/vm1.qga")));
        assert_eq!(d.qmp, Some(PathBuf::from("/run/vm1.qmp")));
    }

    #[test]
    fn round_trips_its_own_output() {
        let d = parse_domain_xml(VIRSH).unwrap();
        assert_eq!(parse_domain_xml(&domain_to_xml(&d)).unwrap(), d);
    }

    #[test]
    fn names_what_is_missing() {
        let e = parse_domain_xml("<domain><devices/></domain>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no <name>"), "{e}");
        let e = parse_domain_xml(
            "<domain><name>x</name><devices><disk><source file='/a'/></disk></devices></domain>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("target"), "{e}");
        let e = parse_domain_xml("<domain><name>a/b</name></domain>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'/'"), "{e}");
    }

    #[test]
    fn finds_the_target_of_blockdev_devices() {
        let v: Value =
            serde_json::json!({"device": "", "qdev": "/machine/peripheral/vdb/virtio-backend"});
        assert_eq!(block_target(&v).as_deref(), Some("vdb"));
        assert_eq!(block_key(&v), "/machine/peripheral/vdb/virtio-backend");
        let v: Value = serde_json::json!({"device": "vda", "qdev": "/machine/peripheral/vda-dev/virtio-backend"});
        assert_eq!(block_target(&v).as_deref(), Some("vda"));
    }
}
