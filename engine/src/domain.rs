//! Domains: a guest's name, its disks (target -> active image), and, when
//! it runs, its QMP socket and guest-agent socket. Defined from a subset of
//! libvirt's `<domain>` XML (so `virsh dumpxml` output is accepted as it
//! is), or attached to a running QEMU by its monitor.
//!
//! The QMP socket comes from `--qmp` or our metadata element:
//! `<metadata><vsnap:qmp xmlns:vsnap="https://vsnap.dev/xmlns/domain/1">/run/vm.qmp</vsnap:qmp></metadata>`.
//! The agent socket is the unix `<channel>` whose target is
//! `org.qemu.guest_agent.0`.

use crate::catalog::dom as catalog;
use crate::xmltree::{self, esc, Element};
use crate::{validate_name_of, Engine, EngineError, NameKind, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vsnap_steps::qmp::BlockDevice;
use vsnap_steps::{live, Format};

// The records live in the catalog (which depends on nothing here).
pub use crate::catalog::dom::{
    put_domain, DiskDevice, DiskSource, DomDisk, DomainRec, SnapshotDefault, DOMAINS,
};

/// The XML namespace of vsnap's `<metadata>` element.
pub const XMLNS: &str = "https://vsnap.dev/xmlns/domain/1";
/// The name of the guest agent's virtio-serial channel in `<domain>`.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// What QEMU says of a domain now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomState {
    /// QEMU runs the guest.
    Running,
    /// QEMU has the guest paused.
    Paused,
    /// No QEMU answers on the monitor (or none is configured).
    Shutoff,
}

impl DomState {
    /// libvirt's word: `running`, `paused`, `shutoff`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomState::Running => "running",
            DomState::Paused => "paused",
            DomState::Shutoff => "shutoff",
        }
    }
}

fn parse_format(s: &str, what: &str) -> Result<Format> {
    Format::parse(s).ok_or_else(|| {
        EngineError::not_supported(format!(
            "{what}: format {s:?} is not supported; vsnap handles qcow2 and raw images"
        ))
    })
}

/// Parse the `<domain>` subset. Unknown elements are left alone.
pub fn parse_domain_xml(text: &str) -> Result<DomainRec> {
    Ok(parse_domain_xml_typed(text)?.0)
}

/// What [`parse_domain_xml`] leaves out of a domain, for the operator
/// (`sda (cdrom, read-only media)`); empty when the XML does not parse.
pub fn domain_left_out(text: &str) -> Vec<String> {
    parse_domain_xml_typed(text)
        .map(|x| x.1)
        .unwrap_or_default()
}

/// libvirt's domain types that run QEMU.
const QEMU_TYPES: &[&str] = &["kvm", "qemu", "hvf"];

/// [`parse_domain_xml`], and the `<disk>`s it leaves out (read-only media).
fn parse_domain_xml_typed(text: &str) -> Result<(DomainRec, Vec<String>)> {
    let mut left_out = Vec::new();
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
    let virt_type = root.attr("type").map(str::to_string);
    if let Some(t) = &virt_type {
        if !QEMU_TYPES.contains(&t.as_str()) {
            return Err(EngineError::Xml(format!(
                "<domain type='{t}'> is not a QEMU domain; vsnap snapshots QEMU guests: type='kvm' or type='qemu'"
            )));
        }
    }
    let mut d = DomainRec {
        name,
        uuid: root.child_text("uuid"),
        disks: Vec::new(),
        qmp: None,
        agent: None,
        current: None,
        next_seq: 0,
        virt_type,
        launch: None,
    };
    if let Some(devices) = root.child("devices") {
        for disk in devices.children_named("disk") {
            let has_source = disk
                .child("source")
                .is_some_and(|s| !s.attrs.is_empty() || !s.children.is_empty());
            let device = match disk.attr("device").unwrap_or("disk") {
                "disk" => DiskDevice::Disk,
                "lun" => DiskDevice::Lun,
                "floppy" if disk.child("readonly").is_none() && has_source => {
                    DiskDevice::Floppy
                }
                m @ ("cdrom" | "floppy") => {
                    let target = disk
                        .child("target")
                        .and_then(|t| t.attr("dev"))
                        .unwrap_or("?");
                    left_out.push(format!(
                        "{target} ({m}, {})",
                        if has_source {
                            "read-only media"
                        } else {
                            "empty"
                        }
                    ));
                    continue;
                }
                other => {
                    return Err(EngineError::Xml(format!(
                        "<disk device='{other}'> is not a device libvirt knows (disk, lun, floppy, cdrom)"
                    )))
                }
            };
            d.disks.push(parse_disk(disk, device)?);
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
        meta.only_one(&["qmp", "launch"])?;
        if let Some(q) = meta.children.iter().find(|c| c.name == "qmp") {
            d.qmp = Some(PathBuf::from(q.text.trim()));
        }
        if let Some(l) = meta.children.iter().find(|c| c.name == "launch") {
            d.launch = Some(parse_launch(l)?);
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
    Ok((d, left_out))
}

/// Why vsnap cannot snapshot a `<disk>` of this type or device (None: a
/// file or block device it can).
fn unsupported_why(disk: &Element, ty: &str, device: DiskDevice) -> Result<Option<String>> {
    let src = disk.child("source");
    let a = |k: &str| src.and_then(|s| s.attr(k)).unwrap_or("?");
    if device == DiskDevice::Lun {
        return Ok(Some(format!(
            "a SCSI LUN passed through to the guest (device='lun', {ty} {}): the guest sends SCSI commands to the device itself",
            src.and_then(|s| s.attr("dev").or(s.attr("file")).or(s.attr("name")))
                .unwrap_or("?")
        )));
    }
    Ok(Some(match ty {
        "file" | "block" => return Ok(None),
        "network" => {
            let hosts: Vec<String> = src
                .into_iter()
                .flat_map(|s| s.children_named("host"))
                .map(|h| match (h.attr("name"), h.attr("port"), h.attr("socket")) {
                    (_, _, Some(sock)) => sock.to_string(),
                    (Some(n), Some(p), _) => format!("{n}:{p}"),
                    (Some(n), None, _) => n.to_string(),
                    _ => "?".into(),
                })
                .collect();
            format!(
                "a network disk ({} {}{}), not a local image",
                a("protocol"),
                a("name"),
                if hosts.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", hosts.join(", "))
                }
            )
        }
        "volume" => format!(
            "a storage-pool volume (pool {}, volume {}), which libvirt resolves; vsnap reads no storage pools",
            a("pool"),
            a("volume")
        ),
        "nvme" => format!(
            "an NVMe namespace ({} on PCI {}) driven by QEMU's own NVMe driver, not a local image",
            a("namespace"),
            src.and_then(|s| s.child("address"))
                .map(|ad| {
                    let f = |k: &str| {
                        ad.attr(k)
                            .map(|v| v.trim_start_matches("0x").to_string())
                            .unwrap_or_else(|| "?".into())
                    };
                    format!("{}:{}:{}.{}", f("domain"), f("bus"), f("slot"), f("function"))
                })
                .unwrap_or_else(|| "?".into())
        ),
        "vhostuser" => format!(
            "a vhost-user disk served by another process (socket {})",
            a("path")
        ),
        "dir" => format!(
            "a directory ({}) shown to the guest as a virtual FAT disk",
            a("dir")
        ),
        other => {
            return Err(EngineError::Xml(format!(
                "<disk type='{other}'> is not a disk type libvirt knows (file, block, dir, network, volume, nvme, vhostuser)"
            )))
        }
    }))
}

fn parse_disk(disk: &Element, device: DiskDevice) -> Result<DomDisk> {
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
    let snapshot = match disk.attr("snapshot") {
        None => None,
        Some(s) => Some(SnapshotDefault::parse(s).ok_or_else(|| {
            EngineError::Xml(format!(
                "disk {target}: snapshot='{s}' is not one of libvirt's values (no, internal, external, manual)"
            ))
        })?),
    };
    let ty = disk.attr("type").unwrap_or("file");
    let driver_type = disk.child("driver").and_then(|d| d.attr("type"));
    let common = |source, format| DomDisk {
        target: target.clone(),
        source,
        format,
        readonly: disk.child("readonly").is_some(),
        shareable: disk.child("shareable").is_some(),
        device,
        snapshot,
    };
    if let Some(why) = unsupported_why(disk, ty, device)? {
        // Never snapshotted: its format is not checked.
        let format = driver_type.and_then(Format::parse).unwrap_or(Format::Raw);
        let xml = xmltree::write(disk, 0);
        return Ok(common(DiskSource::Unsupported { why, xml }, format));
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
    let source = if ty == "block" || src.and_then(|s| s.attr("dev")).is_some() {
        DiskSource::Block(source)
    } else {
        DiskSource::File(source)
    };
    let format = match driver_type {
        Some(t) => parse_format(t, &format!("disk {target}"))?,
        // libvirt's own default without format probing (which libvirt
        // leaves off): raw. Never guessed from the image's bytes, which a
        // guest writes (see image.rs).
        None => Format::Raw,
    };
    Ok(common(source, format))
}

/// `<vsnap:launch cwd='DIR'><vsnap:arg>ARG</vsnap:arg>...<vsnap:disk
/// target='vda' path='IMAGE'/>...</vsnap:launch>` in `<metadata>`: the
/// launch spec as `dumpxml` writes it (each argument the element's text,
/// exactly, whitespace included).
fn parse_launch(l: &Element) -> Result<vsnap_steps::launch::LaunchSpec> {
    let cwd = l.attr("cwd").ok_or_else(|| {
        EngineError::Xml("<vsnap:launch> has no cwd='...' (the working directory)".into())
    })?;
    let argv: Vec<String> = l.children_named("arg").map(|a| a.text.clone()).collect();
    if argv.is_empty() {
        return Err(EngineError::Xml(
            "<vsnap:launch> has no <vsnap:arg>: the command line is empty".into(),
        ));
    }
    let mut disks = Vec::new();
    for x in l.children_named("disk") {
        let (Some(target), Some(path)) = (x.attr("target"), x.attr("path")) else {
            return Err(EngineError::Xml(
                "a <vsnap:disk> in <vsnap:launch> needs target='...' and path='...'".into(),
            ));
        };
        disks.push(vsnap_steps::launch::BoundDisk {
            target: target.into(),
            path: path.into(),
        });
    }
    Ok(vsnap_steps::launch::LaunchSpec {
        argv,
        cwd: cwd.into(),
        disks,
    })
}

/// The `<domain>` subset vsnap keeps, as libvirt writes it.
pub fn domain_to_xml(d: &DomainRec) -> String {
    let mut x = format!(
        "<domain type='{}'>\n",
        esc(d.virt_type.as_deref().unwrap_or("kvm"))
    );
    x.push_str(&format!("  <name>{}</name>\n", esc(&d.name)));
    if let Some(u) = &d.uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", esc(u)));
    }
    if d.qmp.is_some() || d.launch.is_some() {
        x.push_str("  <metadata>\n");
        if let Some(q) = &d.qmp {
            x.push_str(&format!(
                "    <vsnap:qmp xmlns:vsnap='{XMLNS}'>{}</vsnap:qmp>\n",
                esc(&q.to_string_lossy())
            ));
        }
        if let Some(l) = &d.launch {
            x.push_str(&format!(
                "    <vsnap:launch xmlns:vsnap='{XMLNS}' cwd='{}'>\n",
                esc(&l.cwd.to_string_lossy())
            ));
            for a in &l.argv {
                x.push_str(&format!("      <vsnap:arg>{}</vsnap:arg>\n", esc(a)));
            }
            for b in &l.disks {
                x.push_str(&format!(
                    "      <vsnap:disk target='{}' path='{}'/>\n",
                    esc(&b.target),
                    esc(&b.path.to_string_lossy())
                ));
            }
            x.push_str("    </vsnap:launch>\n");
        }
        x.push_str("  </metadata>\n");
    }
    x.push_str("  <devices>\n");
    for disk in &d.disks {
        let (ty, attr, path) = match &disk.source {
            DiskSource::File(p) => ("file", "file", p),
            DiskSource::Block(p) => ("block", "dev", p),
            DiskSource::Unsupported { xml, .. } => {
                for line in xml.lines() {
                    x.push_str("    ");
                    x.push_str(line);
                    x.push('\n');
                }
                continue;
            }
        };
        x.push_str(&format!(
            "    <disk type='{ty}' device='{}'",
            disk.device.as_str()
        ));
        if let Some(s) = disk.snapshot {
            x.push_str(&format!(" snapshot='{}'", s.as_str()));
        }
        x.push_str(">\n");
        x.push_str(&format!(
            "      <driver name='qemu' type='{}'/>\n",
            disk.format
        ));
        x.push_str(&format!(
            "      <source {attr}='{}'/>\n",
            esc(&path.to_string_lossy())
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
/// peripheral id inside `qdev` (`/machine/peripheral/vda/virtio-backend`);
/// see [`vsnap_steps::qmp::BlockDevice::target`].
#[cfg(test)]
pub fn block_target(entry: &Value) -> Option<String> {
    BlockDevice::from_value(entry).target()
}

/// The key a device is found by ([`vsnap_steps::qmp::BlockDevice::key`]:
/// `device`, else `qdev`), from a raw `query-block` entry.
pub fn block_key(entry: &Value) -> String {
    BlockDevice::from_value(entry).key
}

/// A launch spec for `d`: `argv` and `cwd`, each disk bound to its image
/// now (the path `domain start` looks for in the argv).
fn bound_spec(d: &DomainRec, argv: Vec<String>, cwd: PathBuf) -> vsnap_steps::launch::LaunchSpec {
    vsnap_steps::launch::LaunchSpec {
        argv,
        cwd,
        disks: d
            .disks
            .iter()
            .filter_map(|x| {
                Some(vsnap_steps::launch::BoundDisk {
                    target: x.target.clone(),
                    path: x.image()?.to_path_buf(),
                })
            })
            .collect(),
    }
}

/// A path as given, made absolute against the current directory (sockets
/// and images are used later from any directory).
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p)
        .map_err(|e| EngineError::io(format!("cannot make {} absolute: {e}", p.display())))
}

impl Engine {
    /// A domain by name.
    pub fn domain(&self, name: &str) -> Result<DomainRec> {
        catalog::domain(self.journal(), name)?.ok_or_else(|| {
            EngineError::not_found(format!(
                "no domain named {name:?}; `vsnap domain list` lists them, `vsnap domain define` adds one"
            ))
        })
    }

    /// Every domain defined, by name. Changes nothing. Errors: `Journal`.
    pub fn domain_list(&self) -> Result<Vec<DomainRec>> {
        catalog::domains(self.journal())
    }

    fn domain_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .journal()
            .catalog_get(DOMAINS, name.as_bytes())?
            .is_some())
    }

    /// Define a domain from `<domain>` XML; `qmp` overrides the metadata.
    /// No launch spec: the domain can be snapshotted, not started (see
    /// [`Engine::domain_define_with_launch`]).
    pub fn domain_define(&self, xml: &str, qmp: Option<PathBuf>) -> Result<DomainRec> {
        self.domain_define_with_launch(xml, qmp, None)
    }

    /// [`Engine::domain_define`] with the QEMU command line that starts the
    /// domain (`launch`: argv, program first, and the working directory
    /// its relative paths are resolved against; see
    /// [`crate::parse_launch_file`]). Each disk's source in the XML must
    /// be named by one `-drive file=` or `-blockdev filename=` of the
    /// argv, and the argv must open the domain's QMP socket: checked now
    /// ([`EngineError::LaunchOption`]), so that `domain start` can rewrite
    /// it later.
    pub fn domain_define_with_launch(
        &self,
        xml: &str,
        qmp: Option<PathBuf>,
        launch: Option<(Vec<String>, PathBuf)>,
    ) -> Result<DomainRec> {
        let _g = self.lock_ops();
        let (mut d, _) = parse_domain_xml_typed(xml)?;
        if qmp.is_some() {
            d.qmp = qmp;
        }
        d.qmp = d.qmp.as_deref().map(absolute).transpose()?;
        d.agent = d.agent.as_deref().map(absolute).transpose()?;
        for disk in &mut d.disks {
            match &mut disk.source {
                DiskSource::File(p) | DiskSource::Block(p) => *p = absolute(p)?,
                DiskSource::Unsupported { .. } => {}
            }
        }
        if self.domain_exists(&d.name)? {
            return Err(EngineError::name_taken(format!(
                "domain {:?} is already defined; `vsnap domain undefine {}` first",
                d.name, d.name
            )));
        }
        let mut ids: Vec<((u64, u64), &str)> = Vec::new();
        for disk in &d.disks {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let (source, block) = match &disk.source {
                DiskSource::File(p) => (p, false),
                DiskSource::Block(p) => (p, true),
                // Recorded, never opened: a snapshot that includes it is
                // refused (plan_domain_snapshot).
                DiskSource::Unsupported { .. } => continue,
            };
            let meta = std::fs::metadata(source).map_err(|_| {
                EngineError::not_found(format!(
                    "disk {}: source {} does not exist; fix the <source> in the XML",
                    disk.target,
                    source.display()
                ))
            })?;
            let ft = meta.file_type();
            let what = crate::file_type_name(&ft);
            if block && !ft.is_block_device() {
                return Err(EngineError::bad_request(format!(
                    "disk {}: <disk type='block'> names {}, which is {what}, not a block device; fix the <disk> in the XML",
                    disk.target,
                    source.display()
                )));
            }
            if !block && !ft.is_file() {
                return Err(EngineError::bad_request(format!(
                    "disk {}: source {} is {what}, not a disk image file; a <disk type='file'> names an image file (a block device is <disk type='block'> with <source dev=...>)",
                    disk.target,
                    source.display()
                )));
            }
            let id = (meta.dev(), meta.ino());
            if let Some((_, other)) = ids.iter().find(|(i, _)| *i == id) {
                return Err(EngineError::bad_request(format!(
                    "disks {other} and {} both name the image {} (one image for two disks); give each disk its own image",
                    disk.target,
                    source.display()
                )));
            }
            ids.push((id, &disk.target));
            // A loop or an over-deep chain is refused now, not found by
            // the first qemu-img that opens it.
            vsnap_steps::qemu_img::backing_chain(source, disk.format)
                .map_err(|e| EngineError::unsafe_(format!("disk {}: {e}", disk.target)))?;
        }
        if let Some((argv, cwd)) = launch {
            d.launch = Some(bound_spec(&d, argv, cwd));
            if d.qmp.is_none() {
                return Err(EngineError::bad_request(format!(
                    "domain {}: --launch needs the domain's QMP socket (--qmp, or <vsnap:qmp> in the XML): vsnap talks to the QEMU it starts through it",
                    d.name
                )));
            }
            // Refused now, not at the first start.
            crate::launch::QemuLauncher::new(self.journal().state_dir()).plan(
                &d,
                &self.domain_launch_request(
                    &d,
                    vsnap_steps::launch::StartMode {
                        paused: true,
                        incoming: false,
                    },
                ),
            )?;
        }
        self.journal()
            .catalog_apply(&[put_domain(&d), catalog::put_domain_doc(&d.name, xml)])?;
        Ok(d)
    }

    /// Define a domain from a running QEMU: its disks are what
    /// `query-block` reports.
    pub fn domain_attach(&self, name: &str, qmp: &Path, agent: Option<&Path>) -> Result<DomainRec> {
        let _g = self.lock_ops();
        validate_name_of(NameKind::Domain, name)?;
        if self.domain_exists(name)? {
            return Err(EngineError::name_taken(format!(
                "domain {name:?} is already defined; `vsnap domain undefine {name}` first"
            )));
        }
        // Who serves the monitor, before vsnap takes it (it may serve one
        // client at a time): that process's command line is the launch
        // spec. Unreadable, the domain is attached without one.
        let started = vsnap_steps::launch::peer_pid(qmp)
            .ok()
            .and_then(|pid| vsnap_steps::launch::process_argv_cwd(pid).ok());
        let mut q = live::qmp(qmp).map_err(EngineError::Check)?;
        let blocks = q.query_block_typed().map_err(EngineError::Check)?;
        let mut disks = Vec::new();
        for b in &blocks {
            let Some(ins) = &b.inserted else {
                continue;
            };
            let target = b.target().unwrap_or_default();
            let file = ins.file.as_str();
            if file.is_empty() || file.starts_with("json:") {
                return Err(EngineError::not_supported(format!(
                    "disk {target}: QEMU names its image {file:?}, not a plain file; define the domain from XML instead"
                )));
            }
            if !Path::new(file).is_absolute() {
                return Err(EngineError::not_supported(format!(
                    "disk {target}: QEMU names its image {file:?}, a relative path (relative to QEMU's own directory); start QEMU with absolute image paths, or define the domain from XML"
                )));
            }
            let drv = ins.drv.as_str();
            use std::os::unix::fs::FileTypeExt;
            let block = std::fs::metadata(file).is_ok_and(|m| m.file_type().is_block_device());
            disks.push(DomDisk {
                target: target.clone(),
                source: if block {
                    DiskSource::Block(PathBuf::from(file))
                } else {
                    DiskSource::File(PathBuf::from(file))
                },
                format: parse_format(drv, &format!("disk {target}"))?,
                readonly: ins.ro,
                shareable: false,
                device: DiskDevice::Disk,
                snapshot: None,
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
            virt_type: None,
            launch: None,
        };
        let mut d = d;
        if let Some((argv, cwd)) = started {
            d.launch = Some(bound_spec(&d, argv, cwd));
        }
        let mut ops = vec![put_domain(&d)];
        // What was just seen, kept: the first live snapshot then asks
        // QEMU one small question per disk, not the whole graph.
        if let Some(inst) = q.instance() {
            ops.push(catalog::put_qemu_view(
                name,
                &catalog::QemuView::from_blocks(inst, &blocks),
            ));
        }
        self.journal().catalog_apply(&ops)?;
        Ok(d)
    }

    /// Forget a domain. Refused while it has snapshots, unless
    /// `drop_snapshot_metadata` (the files stay; only the catalog forgets).
    pub fn domain_undefine(&self, name: &str, drop_snapshot_metadata: bool) -> Result<()> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        let snaps = catalog::snapshots(self.journal(), &d.name)?;
        if !snaps.is_empty() && !drop_snapshot_metadata {
            return Err(EngineError::bad_request(format!(
                "domain {name:?} has {} snapshot(s); pass --snapshots-metadata to forget them too (their files stay)",
                snaps.len()
            )));
        }
        let mut ops = vec![
            catalog::delete_domain_op(name),
            catalog::delete_domain_doc_op(name),
            catalog::delete_qemu_view(name),
        ];
        ops.extend(
            snaps
                .iter()
                .map(|s| catalog::delete_snapshot_op(&d.name, &s.name)),
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
            // No QEMU answers (socket missing or refusing): shut off,
            // e.g. after a host crash (DESIGN.md 10.1).
            Err(e) if live::is_gone(&e) => Ok(DomState::Shutoff),
            Err(e) => Err(EngineError::Check(e)),
        }
    }

    /// The domain as libvirt `<domain>` XML (its disks as they are now):
    /// the document `domain define` was given, everything vsnap does not
    /// act on kept as it was (see `domdoc`); for an attached domain, one
    /// written from the record. Changes nothing. Errors: `Refused`
    /// `NotFound` (no such domain), `Journal`.
    pub fn domain_xml(&self, name: &str) -> Result<String> {
        self.domain_xml_of(&self.domain(name)?)
    }

    /// [`Engine::domain_xml`] of a record (the catalog's, or one about to
    /// be written).
    pub(crate) fn domain_xml_of(&self, d: &DomainRec) -> Result<String> {
        match catalog::domain_doc(self.journal(), &d.name)? {
            Some(doc) => crate::domdoc::rewrite(&doc, d),
            None => Ok(domain_to_xml(d)),
        }
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
        assert_eq!(d.disks[1].image(), Some(Path::new("/vm/b.raw")));
        assert!(d.disks[1].shareable);
        assert_eq!(d.agent, Some(PathBuf::from("/run/vm1.qga")));
        assert_eq!(d.qmp, Some(PathBuf::from("/run/vm1.qmp")));
    }

    #[test]
    fn round_trips_its_own_output() {
        let d = parse_domain_xml(VIRSH).unwrap();
        assert_eq!(parse_domain_xml(&domain_to_xml(&d)).unwrap(), d);
    }

    /// A launch spec goes through dumpxml and define unchanged: arguments
    /// with spaces at the ends, markup characters, an empty one.
    #[test]
    fn the_launch_spec_round_trips_through_xml() {
        let mut d = parse_domain_xml(VIRSH).unwrap();
        d.launch = Some(vsnap_steps::launch::LaunchSpec {
            argv: vec![
                "qemu-system-x86_64".into(),
                "-append".into(),
                " console=ttyS0 a<b & 'c' \"d\" ".into(),
                "".into(),
                "-drive".into(),
                "file=/vm/a.qcow2,,x,format=qcow2".into(),
            ],
            cwd: "/srv/vm 1".into(),
            disks: vec![vsnap_steps::launch::BoundDisk {
                target: "vda".into(),
                path: "/vm/a.qcow2".into(),
            }],
        });
        let x = domain_to_xml(&d);
        assert_eq!(parse_domain_xml(&x).unwrap(), d, "{x}");
        let e = parse_domain_xml(&x.replace(" cwd='/srv/vm 1'", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cwd"), "{e}");
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

    /// A `<domain>` with these `<devices>`.
    fn dom(devices: &str) -> String {
        format!("<domain type='kvm'><name>t</name><devices>{devices}</devices></domain>")
    }

    /// What is recorded of each `<disk>` document (from libvirt's
    /// formatdomain examples): (xml, target, source path, device, snapshot,
    /// words of the reason vsnap cannot snapshot it).
    #[allow(clippy::type_complexity)]
    const DISKS: &[(&str, &str, Option<&str>, DiskDevice, Option<SnapshotDefault>, &[&str])] = &[
        (
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='image_name2'><host name='hostname' port='7000'/><auth username='myuser'><secret type='ceph' usage='mypassid'/></auth></source><target dev='vdc' bus='virtio'/></disk>",
            "vdc", None, DiskDevice::Disk, None, &["network disk", "rbd image_name2", "hostname:7000"],
        ),
        (
            "<disk type='network'><driver name='qemu' type='raw' io='threads' ioeventfd='on' event_idx='off'/><source protocol='gluster' name='Volume/Image'><host name='example.org' port='6000'/></source><target dev='vda' bus='virtio'/></disk>",
            "vda", None, DiskDevice::Disk, None, &["network disk", "gluster Volume/Image", "example.org:6000"],
        ),
        (
            "<disk type='network'><source protocol='nbd' name='bar'><host transport='unix' socket='/path/to/sock'/></source><target dev='hdb' bus='ide'/></disk>",
            "hdb", None, DiskDevice::Disk, None, &["network disk", "nbd bar", "/path/to/sock"],
        ),
        (
            "<disk type='network' device='disk' snapshot='no'><driver name='qemu' type='raw'/><source protocol='iscsi' name='iqn.2013-07.com.example:iscsi-nopool/2'><host name='example.com' port='3260'/></source><target dev='vdb' bus='virtio'/></disk>",
            "vdb", None, DiskDevice::Disk, Some(SnapshotDefault::No), &["network disk", "iscsi", "example.com:3260"],
        ),
        (
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='blk-pool0' volume='blk-pool0-vol0'/><target dev='hdk' bus='ide'/></disk>",
            "hdk", None, DiskDevice::Disk, None, &["storage-pool volume", "blk-pool0", "blk-pool0-vol0"],
        ),
        (
            "<disk type='nvme' device='disk'><driver name='qemu' type='raw'/><source type='pci' managed='yes' namespace='1'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source><target dev='vde' bus='virtio'/></disk>",
            "vde", None, DiskDevice::Disk, None, &["NVMe", "0000:01:00.0"],
        ),
        (
            "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/><source type='unix' path='/tmp/vhost-blk.sock'><reconnect enabled='yes' timeout='10'/></source><target dev='vdf' bus='virtio'/></disk>",
            "vdf", None, DiskDevice::Disk, None, &["vhost-user", "/tmp/vhost-blk.sock"],
        ),
        (
            "<disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='/dev/sda'/><target dev='sda' bus='scsi'/><address type='drive' controller='0' bus='0' target='3' unit='0'/></disk>",
            "sda", None, DiskDevice::Lun, None, &["SCSI LUN", "/dev/sda"],
        ),
        (
            "<disk type='network' device='lun'><driver name='qemu' type='raw'/><source protocol='iscsi' name='iqn.2013-07.com.example:iscsi-nopool/1'><host name='example.com' port='3260'/></source><target dev='sdb' bus='scsi'/></disk>",
            "sdb", None, DiskDevice::Lun, None, &["SCSI LUN", "device='lun'"],
        ),
        (
            "<disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='/vm/fd.img'/><target dev='fda'/></disk>",
            "fda", Some("/vm/fd.img"), DiskDevice::Floppy, None, &[],
        ),
        (
            "<disk type='file' snapshot='external'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/domain.qcow'/><target dev='vda' bus='virtio'/></disk>",
            "vda", Some("/var/lib/libvirt/images/domain.qcow"), DiskDevice::Disk, Some(SnapshotDefault::External), &[],
        ),
        (
            "<disk type='file' snapshot='internal'><driver name='qemu' type='qcow2'/><source file='/vm/i.qcow2'/><target dev='vdi'/></disk>",
            "vdi", Some("/vm/i.qcow2"), DiskDevice::Disk, Some(SnapshotDefault::Internal), &[],
        ),
        (
            "<disk type='file' snapshot='manual'><driver name='qemu' type='qcow2'/><source file='/vm/m.qcow2'/><target dev='vdm'/></disk>",
            "vdm", Some("/vm/m.qcow2"), DiskDevice::Disk, Some(SnapshotDefault::Manual), &[],
        ),
        (
            "<disk type='block' device='disk' snapshot='no'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vdg'/></disk>",
            "vdg", Some("/dev/vg/lv"), DiskDevice::Disk, Some(SnapshotDefault::No), &[],
        ),
    ];

    #[test]
    fn records_every_kind_of_disk_and_writes_it_back() {
        for (xml, target, source, device, snapshot, why) in DISKS {
            let d = parse_domain_xml(&dom(xml)).unwrap_or_else(|e| panic!("{xml}: {e}"));
            assert_eq!(d.disks.len(), 1, "{xml}");
            let disk = &d.disks[0];
            assert_eq!(disk.target, *target, "{xml}");
            assert_eq!(disk.image(), source.map(Path::new), "{xml}");
            assert_eq!(disk.device, *device, "{xml}");
            assert_eq!(disk.snapshot, *snapshot, "{xml}");
            match disk.unsupported() {
                Some(w) => {
                    assert!(!why.is_empty(), "{xml}: unexpectedly unsupported: {w}");
                    for word in *why {
                        assert!(w.contains(word), "{xml}: {w:?} lacks {word:?}");
                    }
                }
                None => assert!(why.is_empty(), "{xml}: recorded as a local image"),
            }
            let back = domain_to_xml(&d);
            assert_eq!(parse_domain_xml(&back).unwrap(), d, "{back}");
            if let Some(s) = snapshot {
                assert!(
                    back.contains(&format!("snapshot='{}'", s.as_str())),
                    "{back}"
                );
            }
        }
    }

    #[test]
    fn block_disks_and_the_domain_type_are_kept() {
        let x = "<domain type='qemu'><name>t</name><devices><disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/nonexistent/blk'/><target dev='vdb'/></disk><disk type='file'><source file='/vm/a.raw'/><target dev='vda'/></disk></devices></domain>";
        let d = parse_domain_xml(x).unwrap();
        assert_eq!(d.virt_type.as_deref(), Some("qemu"));
        assert_eq!(
            d.disks[0].source,
            DiskSource::Block("/nonexistent/blk".into())
        );
        assert_eq!(d.disks[1].source, DiskSource::File("/vm/a.raw".into()));
        let back = domain_to_xml(&d);
        assert!(back.starts_with("<domain type='qemu'>"), "{back}");
        assert!(back.contains("<disk type='block' device='disk'>"), "{back}");
        assert!(back.contains("<source dev='/nonexistent/blk'/>"), "{back}");
        assert_eq!(parse_domain_xml(&back).unwrap(), d);
        let kvm = parse_domain_xml(&dom("")).unwrap();
        assert_eq!(kvm.virt_type.as_deref(), Some("kvm"));
        assert!(domain_to_xml(&kvm).starts_with("<domain type='kvm'>"));
        let e = parse_domain_xml("<domain type='xen'><name>t</name></domain>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("type='xen'") && e.contains("kvm"), "{e}");
    }

    #[test]
    fn read_only_media_are_left_out_and_named() {
        let x = dom(
            "<disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='sda'/><readonly/></disk>\
             <disk type='file' device='floppy'><source file='/vm/ro.img'/><target dev='fda'/><readonly/></disk>\
             <disk type='file' device='floppy'><target dev='fdb'/></disk>\
             <disk type='file' device='disk'><source file='/vm/a.raw'/><target dev='vda'/></disk>",
        );
        let d = parse_domain_xml(&x).unwrap();
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(
            domain_left_out(&x),
            [
                "sda (cdrom, read-only media)",
                "fda (floppy, read-only media)",
                "fdb (floppy, empty)"
            ]
        );
    }

    #[test]
    fn a_wrong_snapshot_type_or_device_is_named() {
        for (xml, words) in [
            (
                "<disk snapshot='sometimes'><source file='/a'/><target dev='vda'/></disk>",
                &["vda", "snapshot='sometimes'", "manual"][..],
            ),
            (
                "<disk type='cloud'><source file='/a'/><target dev='vda'/></disk>",
                &["type='cloud'", "network"],
            ),
            (
                "<disk device='tape'><source file='/a'/><target dev='vda'/></disk>",
                &["device='tape'", "lun"],
            ),
        ] {
            let e = parse_domain_xml(&dom(xml)).unwrap_err().to_string();
            for w in words {
                assert!(e.contains(w), "{xml}: {e:?} lacks {w:?}");
            }
        }
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
