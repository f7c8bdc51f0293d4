//! Starting and stopping QEMU from a recorded command line (DESIGN 10.2).
//!
//! A [`LaunchSpec`] is how a domain's QEMU was started: its argv, its
//! working directory, and which image each disk had in that argv when it
//! was recorded (`domain attach` reads all three from the running QEMU;
//! `domain define --launch` takes them from a file and the XML).
//!
//! [`plan_argv`] is pure: it rewrites each disk's path in the recorded
//! options to the image the disk is to start on (`-drive file=` and
//! `file.filename=`, `-blockdev` key=value or JSON `filename`, with the
//! format driver set to the image's format), drops `-S`, `-daemonize` and
//! `-incoming` and adds vsnap's own (`-S` always: vsnap checks the images
//! before the guest runs, then resumes it; `-incoming defer` to load a
//! memory state). Whatever it cannot rewrite is an [`ArgvError`] naming
//! the option, before anything is touched: a disk whose recorded image no
//! option names, a path given twice, `-readconfig` (it can hold drives
//! vsnap does not see), a legacy `-hda`/`-cdrom`/positional image naming a
//! disk, a `backing` given on the command line, a format driver other than
//! raw or qcow2, a QMP socket other than the domain's.
//!
//! [`spawn`] starts the planned argv so that QEMU outlives vsnap: its own
//! session (`setsid`), stdin from /dev/null, stdout and stderr appended to
//! a log file, never the caller's terminal. [`wait_monitor`] waits until
//! the monitor answers and its peer (`SO_PEERCRED`) is that process.
//! [`peer_pid`], [`Pidfd`]: the process behind a monitor socket, and a
//! handle on it that no pid reuse can redirect (`pidfd_open`).

use crate::{Format, StepError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a domain's QEMU is started: recorded by `domain attach` from the
/// running process, or given to `domain define --launch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The command line, program first, as QEMU got it.
    pub argv: Vec<String>,
    /// The working directory relative paths in `argv` are resolved against.
    #[serde(with = "crate::pathser")]
    pub cwd: PathBuf,
    /// For each disk (by target), the image the argv names for it as
    /// recorded: the path [`plan_argv`] looks for to rewrite.
    pub disks: Vec<BoundDisk>,
}

/// A disk's image as the recorded argv names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDisk {
    /// The disk's target (`vda`).
    pub target: String,
    /// Its image when the argv was recorded (absolute).
    #[serde(with = "crate::pathser")]
    pub path: PathBuf,
}

/// One disk to start on: where the argv names it, and what it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskImage {
    /// The disk's target (`vda`).
    pub target: String,
    /// The image to start it on (the catalog's active image).
    pub image: PathBuf,
    /// That image's format.
    pub format: Format,
}

/// An option of the recorded command line vsnap cannot rewrite (or
/// refuses to start with), found before anything is touched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("launch option {option}: {why}")]
pub struct ArgvError {
    /// The option as given (`-drive file=/vm/a.qcow2,if=virtio`), or the
    /// disk (`disk vda`) when no option names it.
    pub option: String,
    /// Why, and what to do.
    pub why: String,
}

/// What [`plan_argv`] makes: the program (resolved through `PATH`) and
/// the whole argv to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedArgv {
    /// The program to execute (absolute).
    pub program: PathBuf,
    /// The argv (program name first), disks rewritten, vsnap's options added.
    pub argv: Vec<String>,
    /// The working directory.
    pub cwd: PathBuf,
}

/// How a planned start leaves the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartMode {
    /// Keep the guest paused once started (else vsnap resumes it after
    /// checking the images).
    pub paused: bool,
    /// Start with `-incoming defer`: QEMU waits for `migrate-incoming`
    /// (a memory state); the guest is not resumed by the launcher.
    pub incoming: bool,
}

/// QEMU's options that take no argument (qemu-options.hx, 7.2); every
/// other option takes one.
const NO_ARG: &[&str] = &[
    "h",
    "help",
    "version",
    "S",
    "s",
    "snapshot",
    "nographic",
    "portrait",
    "full-screen",
    "win2k-hack",
    "no-fd-bootchk",
    "no-acpi",
    "no-hpet",
    "usb",
    "enable-kvm",
    "daemonize",
    "nodefaults",
    "nodefconfig",
    "no-user-config",
    "no-reboot",
    "no-shutdown",
    "no-quit",
    "preconfig",
    "only-migratable",
    "enable-fips",
    "mem-prealloc",
    "semihosting",
    "singlestep",
    "alt-grab",
    "ctrl-grab",
    "no-frame",
    "sdl",
    "curses",
    "show-cursor",
    "xen-attach",
    "xen-domid-restrict",
    "old-param",
    "audio-help",
    "enable-sync-profile",
    "perfmap",
    "jitdump",
    "rtc-td-hack",
    "async-teardown",
];

/// Legacy options that name an image without a `-drive`.
const LEGACY_IMAGE: &[&str] = &[
    "hda", "hdb", "hdc", "hdd", "fda", "fdb", "cdrom", "sd", "mtdblock", "pflash",
];

/// One option of the command line: its name (without dashes; empty for a
/// positional argument) and its value.
#[derive(Clone, Debug)]
struct Opt {
    /// As written (`-drive`, `--drive`), or empty for a positional.
    flag: String,
    name: String,
    value: Option<String>,
}

impl Opt {
    fn shown(&self) -> String {
        match (&self.flag[..], &self.value) {
            ("", Some(v)) => v.clone(),
            (f, Some(v)) => format!("{f} {v}"),
            (f, None) => f.to_string(),
        }
    }
}

fn err(option: impl Into<String>, why: impl Into<String>) -> ArgvError {
    ArgvError {
        option: option.into(),
        why: why.into(),
    }
}

fn split_options(argv: &[String]) -> Result<Vec<Opt>, ArgvError> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a.len() > 1 && a.starts_with('-') {
            let name = a.trim_start_matches('-').to_string();
            if NO_ARG.contains(&name.as_str()) {
                out.push(Opt {
                    flag: a.clone(),
                    name,
                    value: None,
                });
            } else {
                let Some(v) = argv.get(i) else {
                    return Err(err(a, "takes a value and none follows"));
                };
                i += 1;
                out.push(Opt {
                    flag: a.clone(),
                    name,
                    value: Some(v.clone()),
                });
            }
        } else {
            // A positional argument is QEMU's -hda.
            out.push(Opt {
                flag: String::new(),
                name: String::new(),
                value: Some(a.clone()),
            });
        }
    }
    Ok(out)
}

/// QEMU's `key=value,...` with `,,` for a comma inside a value; a part
/// without `=` is kept as a key with no value.
fn parse_kv(s: &str) -> Vec<(String, Option<String>)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (p, None),
        })
        .collect()
}

fn write_kv(kv: &[(String, Option<String>)]) -> String {
    kv.iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={}", v.replace(',', ",,")),
            None => k.replace(',', ",,"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn kv_get<'a>(kv: &'a [(String, Option<String>)], key: &str) -> Option<&'a str> {
    kv.iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_deref())
}

fn kv_set(kv: &mut Vec<(String, Option<String>)>, key: &str, value: &str) {
    match kv.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = Some(value.to_string()),
        None => kv.push((key.to_string(), Some(value.to_string()))),
    }
}

/// A `-blockdev`'s options, dotted keys for nested ones.
#[derive(Clone, Debug)]
enum Blockdev {
    Kv(Vec<(String, Option<String>)>),
    Json(Value),
}

impl Blockdev {
    fn parse(s: &str) -> Result<Blockdev, String> {
        if s.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))?;
            if !v.is_object() {
                return Err("not a JSON object".into());
            }
            Ok(Blockdev::Json(v))
        } else {
            Ok(Blockdev::Kv(parse_kv(s)))
        }
    }

    /// Every (dotted key, string value).
    fn flat(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, x, out);
                    }
                }
                Value::String(s) => out.push((prefix.to_string(), s.clone())),
                Value::Null => out.push((prefix.to_string(), "null".into())),
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        match self {
            Blockdev::Kv(kv) => kv
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect(),
            Blockdev::Json(v) => {
                let mut out = Vec::new();
                walk("", v, &mut out);
                out
            }
        }
    }

    fn get(&self, key: &str) -> Option<String> {
        self.flat()
            .into_iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn has_prefix(&self, key: &str) -> bool {
        self.flat()
            .iter()
            .any(|(k, _)| k == key || k.starts_with(&format!("{key}.")))
    }

    fn set(&mut self, key: &str, value: &str) {
        match self {
            Blockdev::Kv(kv) => kv_set(kv, key, value),
            Blockdev::Json(v) => {
                let mut cur = v;
                let parts: Vec<&str> = key.split('.').collect();
                for p in &parts[..parts.len() - 1] {
                    cur = cur
                        .as_object_mut()
                        .expect("a JSON blockdev is an object")
                        .entry(p.to_string())
                        .or_insert_with(|| Value::Object(Default::default()));
                }
                if let Some(m) = cur.as_object_mut() {
                    m.insert(
                        parts[parts.len() - 1].to_string(),
                        Value::String(value.into()),
                    );
                }
            }
        }
    }

    fn write(&self) -> String {
        match self {
            Blockdev::Kv(kv) => write_kv(kv),
            Blockdev::Json(v) => v.to_string(),
        }
    }
}

/// `p` made absolute against `cwd`, `.` and `..` taken lexically.
fn resolve(cwd: &Path, p: &str) -> PathBuf {
    let joined = cwd.join(p);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Whether `value` (a path in the argv) names the file `bound`: the same
/// path once resolved, or the same inode.
fn names(cwd: &Path, value: &str, bound: &Path) -> bool {
    if value.is_empty() || value.starts_with("json:") {
        return false;
    }
    let p = resolve(cwd, value);
    if p == bound {
        return true;
    }
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(&p), std::fs::metadata(bound)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Where an option names a path: the option's index and the key.
#[derive(Clone, Debug)]
struct Site {
    opt: usize,
    key: String,
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// The QMP sockets the command line opens (`-qmp unix:PATH,...`,
/// `-qmp-pretty`, `-chardev socket,path=...` used by
/// `-mon chardev=ID,mode=control`), resolved against `cwd`.
fn qmp_sockets(opts: &[Opt], cwd: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut chardevs = std::collections::BTreeMap::new();
    for o in opts {
        let Some(v) = &o.value else { continue };
        match o.name.as_str() {
            "qmp" | "qmp-pretty" => {
                let kv = parse_kv(v);
                if let Some((first, None)) = kv.first() {
                    if let Some(p) = first.strip_prefix("unix:") {
                        out.push(resolve(cwd, p));
                    }
                }
            }
            "chardev" => {
                let kv = parse_kv(v);
                if kv.first().map(|x| x.0.as_str()) == Some("socket") {
                    if let (Some(id), Some(path)) = (kv_get(&kv, "id"), kv_get(&kv, "path")) {
                        chardevs.insert(id.to_string(), resolve(cwd, path));
                    }
                }
            }
            _ => {}
        }
    }
    for o in opts.iter().filter(|o| o.name == "mon") {
        let kv = parse_kv(o.value.as_deref().unwrap_or(""));
        if kv_get(&kv, "mode") == Some("control") {
            if let Some(p) = kv_get(&kv, "chardev").and_then(|c| chardevs.get(c)) {
                out.push(p.clone());
            }
        }
    }
    out
}

/// Find `name` on `PATH` (as `execvp` would), or take it as a path.
pub fn resolve_program(name: &str, cwd: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = resolve(cwd, name);
        return exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| exec(p))
}

/// The argv to start `spec` with each of `disks` on its image, the QMP
/// socket checked against `qmp`. Pure but for reading file metadata (to
/// match a path by inode, and to tell a block device) and `PATH`.
pub fn plan_argv(
    spec: &LaunchSpec,
    disks: &[DiskImage],
    qmp: &Path,
    mode: StartMode,
) -> Result<PlannedArgv, ArgvError> {
    let Some(program) = spec.argv.first() else {
        return Err(err(
            "(empty command line)",
            "the launch command line is empty",
        ));
    };
    let cwd = &spec.cwd;
    let mut opts = split_options(&spec.argv)?;
    if let Some(o) = opts.iter().find(|o| o.name == "readconfig") {
        return Err(err(
            o.shown(),
            "a configuration file can define drives vsnap cannot see or rewrite; put the drives on the command line (-drive or -blockdev)",
        ));
    }
    if let Some(o) = opts.iter().find(|o| o.name == "snapshot") {
        return Err(err(
            o.shown(),
            "QEMU would write the guest's changes to temporary files and drop them at exit, not to the disks' images; remove it",
        ));
    }
    if let Some(o) = opts.iter().find(|o| o.name == "loadvm") {
        return Err(err(
            o.shown(),
            "QEMU would load that internal snapshot at every start, discarding the disks' state; remove it (`vsnap snapshot revert` reverts)",
        ));
    }
    // The monitor vsnap talks to must be one QEMU opens.
    let sockets = qmp_sockets(&opts, cwd);
    if !sockets.iter().any(|s| s == qmp) {
        return Err(err(
            "-qmp",
            format!(
                "the command line opens no QMP monitor at {} (the domain's; it opens {}); add -qmp unix:{},server=on,wait=off",
                qmp.display(),
                if sockets.is_empty() {
                    "none".to_string()
                } else {
                    sockets
                        .iter()
                        .map(|s| s.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                qmp.display()
            ),
        ));
    }
    // Parsed -drive and -blockdev options, by option index.
    let mut drives: std::collections::BTreeMap<usize, Vec<(String, Option<String>)>> =
        Default::default();
    let mut blockdevs: std::collections::BTreeMap<usize, Blockdev> = Default::default();
    for (i, o) in opts.iter().enumerate() {
        let v = o.value.as_deref().unwrap_or("");
        match o.name.as_str() {
            "drive" => {
                drives.insert(i, parse_kv(v));
            }
            "blockdev" => {
                let b = Blockdev::parse(v).map_err(|e| err(o.shown(), e))?;
                blockdevs.insert(i, b);
            }
            _ => {}
        }
    }
    for d in disks {
        let bound = spec
            .disks
            .iter()
            .find(|b| b.target == d.target)
            .ok_or_else(|| {
                err(
                    format!("disk {}", d.target),
                    "the launch spec was recorded without this disk; record it again (`vsnap domain undefine` and `domain attach` or `domain define --launch`)",
                )
            })?;
        let mut sites: Vec<Site> = Vec::new();
        for (i, kv) in &drives {
            for (k, v) in kv {
                if let Some(v) = v {
                    if (k == "file" || k == "file.filename") && names(cwd, v, &bound.path) {
                        sites.push(Site {
                            opt: *i,
                            key: k.clone(),
                        });
                    }
                }
                let json_naming_it = v.as_deref().is_some_and(|v| {
                    v.starts_with("json:") && v.contains(&*bound.path.to_string_lossy())
                });
                if k == "file" && json_naming_it {
                    return Err(err(
                        opts[*i].shown(),
                        format!("disk {}: a json: filename is not a form vsnap rewrites; give the image as file=PATH", d.target),
                    ));
                }
            }
        }
        for (i, b) in &blockdevs {
            for (k, v) in b.flat() {
                if (k == "filename" || k.ends_with(".filename")) && names(cwd, &v, &bound.path) {
                    sites.push(Site { opt: *i, key: k });
                }
            }
        }
        for o in &opts {
            let legacy = o.flag.is_empty() || LEGACY_IMAGE.contains(&o.name.as_str());
            if legacy
                && o.value
                    .as_deref()
                    .is_some_and(|v| names(cwd, v, &bound.path))
            {
                return Err(err(
                    o.shown(),
                    format!("disk {}: vsnap rewrites images given with -drive file=PATH or -blockdev; give this one so", d.target),
                ));
            }
        }
        match sites.len() {
            0 => {
                return Err(err(
                    format!("disk {}", d.target),
                    format!(
                        "no -drive file= or -blockdev filename= names its image as recorded ({}); vsnap cannot tell which option to rewrite",
                        bound.path.display()
                    ),
                ))
            }
            1 => {}
            _ => {
                return Err(err(
                    sites
                        .iter()
                        .map(|s| opts[s.opt].shown())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    format!(
                        "disk {}: its image {} is given twice; vsnap cannot tell which to rewrite",
                        d.target,
                        bound.path.display()
                    ),
                ))
            }
        }
        let site = &sites[0];
        let image = d.image.to_str().ok_or_else(|| {
            err(
                format!("disk {}", d.target),
                format!("its image {} is not UTF-8", d.image.display()),
            )
        })?;
        let format = d.format.as_str();
        if let Some(kv) = drives.get_mut(&site.opt) {
            let shown = opts[site.opt].shown();
            if kv
                .iter()
                .any(|(k, _)| k == "backing" || k.starts_with("backing."))
            {
                return Err(err(
                    shown,
                    format!("disk {}: a backing given on the command line would not follow the disk's new image; let QEMU open the image's own backing file", d.target),
                ));
            }
            if matches!(kv_get(kv, "snapshot"), Some("on" | "yes" | "true")) {
                return Err(err(
                    shown,
                    format!("disk {}: snapshot=on makes QEMU write the guest's changes to a temporary file, not to the disk's image; remove it", d.target),
                ));
            }
            if let Some(f) = kv_get(kv, "format").or(kv_get(kv, "driver")) {
                if Format::parse(f).is_none() {
                    return Err(err(
                        shown,
                        format!("disk {}: format {f} is not raw or qcow2", d.target),
                    ));
                }
            }
            kv_set(kv, &site.key, image);
            if kv_get(kv, "driver").is_some() {
                kv_set(kv, "driver", format);
            } else {
                kv_set(kv, "format", format);
            }
            continue;
        }
        // A -blockdev.
        let shown = opts[site.opt].shown();
        let b = blockdevs
            .get_mut(&site.opt)
            .expect("a site is a known option");
        let protocol = if is_block_device(&d.image) {
            "host_device"
        } else {
            "file"
        };
        if site.key == "filename" {
            // A protocol node; its format node (if any) names it by node-name.
            let drv = b.get("driver").unwrap_or_default();
            if drv != "file" && drv != "host_device" {
                return Err(err(
                    shown,
                    format!(
                        "disk {}: driver {drv:?} is not file or host_device",
                        d.target
                    ),
                ));
            }
            b.set("filename", image);
            b.set("driver", protocol);
            let node = b.get("node-name");
            let users: Vec<usize> = blockdevs
                .iter()
                .filter(|(_, x)| node.is_some() && x.get("file") == node)
                .map(|(i, _)| *i)
                .collect();
            match users.len() {
                0 if d.format == Format::Raw => {}
                0 => {
                    return Err(err(
                        shown,
                        format!("disk {}: the device uses this file node directly (a raw disk), and the disk's image is now {format}; add a format node (-blockdev driver=raw,file=NODE,node-name=...) to the launch command", d.target),
                    ))
                }
                1 => {
                    let f = blockdevs.get_mut(&users[0]).expect("listed above");
                    let fshown = opts[users[0]].shown();
                    check_format_node(f, &fshown, &d.target)?;
                    f.set("driver", format);
                }
                _ => {
                    return Err(err(
                        shown,
                        format!("disk {}: more than one format node uses this file node", d.target),
                    ))
                }
            }
        } else if site.key == "file.filename" {
            check_format_node(b, &shown, &d.target)?;
            let drv = b.get("file.driver").unwrap_or_default();
            if drv != "file" && drv != "host_device" {
                return Err(err(
                    shown,
                    format!(
                        "disk {}: file.driver {drv:?} is not file or host_device",
                        d.target
                    ),
                ));
            }
            b.set("file.filename", image);
            b.set("file.driver", protocol);
            b.set("driver", format);
        } else {
            return Err(err(
                shown,
                format!("disk {}: the image is named by {}, a nesting vsnap does not rewrite (filename or file.filename)", d.target, site.key),
            ));
        }
    }
    // Write the options back, without the ones vsnap sets itself.
    let mut argv = vec![program.clone()];
    for (i, o) in opts.iter_mut().enumerate() {
        if matches!(o.name.as_str(), "S" | "daemonize" | "incoming") {
            continue;
        }
        if let Some(kv) = drives.get(&i) {
            o.value = Some(write_kv(kv));
        }
        if let Some(b) = blockdevs.get(&i) {
            o.value = Some(b.write());
        }
        if !o.flag.is_empty() {
            argv.push(o.flag.clone());
        }
        if let Some(v) = &o.value {
            argv.push(v.clone());
        }
    }
    argv.push("-S".into());
    if mode.incoming {
        argv.push("-incoming".into());
        argv.push("defer".into());
    }
    let program = resolve_program(program, cwd).ok_or_else(|| {
        err(
            program.clone(),
            "no such program (not an executable file, nor found on PATH)",
        )
    })?;
    Ok(PlannedArgv {
        program,
        argv,
        cwd: cwd.clone(),
    })
}

fn check_format_node(b: &Blockdev, shown: &str, target: &str) -> Result<(), ArgvError> {
    let drv = b.get("driver").unwrap_or_default();
    if Format::parse(&drv).is_none() {
        return Err(err(
            shown,
            format!("disk {target}: format driver {drv:?} is not raw or qcow2"),
        ));
    }
    if b.has_prefix("backing") {
        return Err(err(
            shown,
            format!("disk {target}: a backing given on the command line would not follow the disk's new image; let QEMU open the image's own backing file"),
        ));
    }
    Ok(())
}

/// What starting QEMU failed on (nothing is left running).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file of the state directory (log, pidfile) could not be written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// QEMU exited before its monitor answered.
    #[error("QEMU exited during start ({status}); its last words (log {}):\n{tail}", .log.display())]
    Exited {
        /// How it exited.
        status: String,
        /// The log file.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// The monitor did not answer in time (QEMU was killed).
    #[error("QEMU's monitor at {} did not answer within {} s; QEMU was killed (log {})", .qmp.display(), .timeout.as_secs(), .log.display())]
    NoMonitor {
        /// The monitor socket.
        qmp: PathBuf,
        /// How long vsnap waited.
        timeout: Duration,
        /// The log file.
        log: PathBuf,
    },
    /// QEMU started but runs on other images than planned (it was quit).
    #[error("QEMU started on other images than planned: {0}; it was stopped")]
    WrongImages(String),
    /// Talking to the new QEMU failed (it was killed).
    #[error("the new QEMU's monitor failed: {0}; QEMU was killed")]
    Monitor(#[source] StepError),
}

/// The last `max` bytes of a file from byte `from` on (what one start
/// wrote to an appended log), lossily.
pub fn log_tail(path: &Path, from: u64, max: usize) -> String {
    let b = std::fs::read(path).unwrap_or_default();
    let from = (from as usize).min(b.len());
    let start = b.len().saturating_sub(max).max(from);
    String::from_utf8_lossy(&b[start..]).into_owned()
}

/// Start `planned` in a session of its own, stdio to `log` (appended),
/// so that it outlives this process. Returns the child (the caller reaps
/// it; dropping it does not kill it) and where this start's part of the
/// log begins.
pub fn spawn(planned: &PlannedArgv, log: &Path) -> Result<(Child, u64), LaunchError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let io_err = |op, source| LaunchError::Io {
        op,
        path: log.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map_err(|e| io_err("open", e))?;
    let from = f.metadata().map(|m| m.len()).unwrap_or(0);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(
        f,
        "vsnap: starting at {stamp} (seconds since the epoch): {:?}",
        planned.argv
    )
    .map_err(|e| io_err("write", e))?;
    let f2 = f.try_clone().map_err(|e| io_err("dup", e))?;
    let mut c = Command::new(&planned.program);
    c.arg0(&planned.argv[0])
        .args(&planned.argv[1..])
        .current_dir(&planned.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2));
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn().map_err(|source| LaunchError::Spawn {
        program: planned.program.clone(),
        source,
    })?;
    Ok((child, from))
}

/// The pid of the process that listens on the unix socket `path`
/// (`SO_PEERCRED` of a connection to it; nothing is sent, so a monitor
/// that serves one client at a time is not taken).
pub fn peer_pid(path: &Path) -> io::Result<u32> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    let cred = crate::fdpass::peer_cred(s.as_raw_fd())?;
    if cred.pid <= 0 {
        return Err(io::Error::other("the socket's peer has no pid"));
    }
    Ok(cred.pid as u32)
}

/// The command line (`/proc/PID/cmdline`) and working directory
/// (`/proc/PID/cwd`) of a process.
pub fn process_argv_cwd(pid: u32) -> io::Result<(Vec<String>, PathBuf)> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    // Every argument ends with a NUL: drop the empty piece after the last.
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    let argv = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8(a.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| io::Error::other("the command line is not UTF-8"))?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
    Ok((argv, cwd))
}

/// A handle on a process (`pidfd_open`): signals and waits reach that
/// process even if its pid is reused.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Open a handle on `pid`.
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open takes a pid and flags; returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: r is a new descriptor we own.
        Ok(Pidfd {
            fd: unsafe { OwnedFd::from_raw_fd(r as i32) },
            pid,
        })
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Wait up to `timeout` for the process to exit; true when it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r > 0 {
                return true;
            }
            if r == 0 || Instant::now() >= deadline {
                return false;
            }
            // EINTR: again.
        }
    }

    /// Send `sig` to the process.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our descriptor, no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Gone already (exited, not yet reaped): nothing to signal.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Wait until the monitor at `qmp` is served by `child` (its
/// `SO_PEERCRED` pid; a stale socket file or another process is not it)
/// and answers, for at most `timeout`. `child` exiting first is
/// [`LaunchError::Exited`]; no answer in time kills it
/// ([`LaunchError::NoMonitor`]).
pub fn wait_monitor(
    child: &mut Child,
    qmp: &Path,
    (log, log_from): (&Path, u64),
    timeout: Duration,
) -> Result<crate::qmp::Qmp, LaunchError> {
    let deadline = Instant::now() + timeout;
    let pid = child.id();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(LaunchError::Exited {
                status: st.to_string(),
                log: log.to_path_buf(),
                tail: log_tail(log, log_from, 2000),
            });
        }
        if peer_pid(qmp).is_ok_and(|p| p == pid) {
            let left = deadline.saturating_duration_since(Instant::now());
            match crate::qmp::Qmp::connect(qmp, left.max(Duration::from_secs(1))) {
                Ok(q) => return Ok(q),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LaunchError::Monitor(e));
                }
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LaunchError::NoMonitor {
                qmp: qmp.to_path_buf(),
                timeout,
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long a new QEMU's monitor may take to answer.
pub const MONITOR_WAIT: Duration = Duration::from_secs(30);
/// How long QEMU may take to exit after `quit` before it is killed.
pub const QUIT_WAIT: Duration = Duration::from_secs(10);

/// Field 22 of `/proc/PID/stat`: when the process started (clock ticks
/// since boot); with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // rest starts at field 3 (state): field 22 is the 20th of rest.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Write `PID START-TIME` to `path` (a temporary, renamed). Not fsynced:
/// after a host crash no process it could name is alive, and a pid is
/// believed only with its start time ([`pid_from_file`]).
pub fn write_pidfile(path: &Path, pid: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pid.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    writeln!(f, "{pid} {}", start_time(pid).unwrap_or(0))?;
    std::fs::rename(&tmp, path)
}

/// The process a pidfile names, if it is alive and started when the
/// pidfile says (a reused pid is not it). A zombie is not alive: it has
/// exited (closed its files, dropped its image locks) and only waits to
/// be reaped, which a QEMU that outlived the vsnap that started it waits
/// for from whatever reaps orphans here, sometimes for seconds.
pub fn pid_from_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    if matches!(rest.split_whitespace().next(), Some("Z" | "X")) {
        return None;
    }
    (start_time(pid)? == start).then_some(pid)
}

/// How [`end_process`] ended a QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It quit when asked (QMP `quit`).
    Quit,
    /// It was killed (SIGKILL).
    Killed,
}

/// End QEMU `pid`: QMP `quit` on `qmp` when its monitor answers from that
/// very process, then SIGKILL if it has not exited within [`QUIT_WAIT`].
pub fn end_process(qmp: Option<&Path>, pid: u32) -> io::Result<Ended> {
    let pidfd = Pidfd::open(pid)?;
    let mut quit = false;
    if let Some(qmp) = qmp.filter(|q| peer_pid(q).is_ok_and(|p| p == pid)) {
        if let Ok(mut q) = crate::qmp::Qmp::connect(qmp, Duration::from_secs(5)) {
            quit = q.quit().is_ok();
        }
    }
    if quit && pidfd.wait_exit(QUIT_WAIT) {
        return Ok(Ended::Quit);
    }
    pidfd.signal(libc::SIGKILL)?;
    if !pidfd.wait_exit(QUIT_WAIT) {
        return Err(io::Error::other(format!(
            "QEMU (pid {pid}) still exists {} s after SIGKILL (stuck in the kernel?)",
            QUIT_WAIT.as_secs()
        )));
    }
    Ok(Ended::Killed)
}

/// A launch with every name and path fixed: what [`crate::Step::QemuLaunch`]
/// journals and runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The program (absolute).
    #[serde(with = "crate::pathser")]
    pub program: PathBuf,
    /// The argv, disks rewritten, `-S` added ([`plan_argv`]).
    pub argv: Vec<String>,
    /// Its working directory.
    #[serde(with = "crate::pathser")]
    pub cwd: PathBuf,
    /// The monitor socket the argv opens.
    #[serde(with = "crate::pathser")]
    pub qmp: PathBuf,
    /// stdout and stderr go here (appended).
    #[serde(with = "crate::pathser")]
    pub log: PathBuf,
    /// `PID START-TIME`, written as soon as QEMU is spawned.
    #[serde(with = "crate::pathser")]
    pub pidfile: PathBuf,
    /// Every disk (target) and the image QEMU must show for it.
    pub images: Vec<BoundDisk>,
}

impl Launch {
    /// The launch of `planned` with these files, monitor and images.
    pub fn new(
        planned: PlannedArgv,
        qmp: &Path,
        run_dir: &Path,
        domain: &str,
        disks: &[DiskImage],
    ) -> Launch {
        Launch {
            program: planned.program,
            argv: planned.argv,
            cwd: planned.cwd,
            qmp: qmp.to_path_buf(),
            log: run_dir.join(format!("{domain}.log")),
            pidfile: run_dir.join(format!("{domain}.pid")),
            images: disks
                .iter()
                .map(|d| BoundDisk {
                    target: d.target.clone(),
                    path: d.image.clone(),
                })
                .collect(),
        }
    }

    fn planned(&self) -> PlannedArgv {
        PlannedArgv {
            program: self.program.clone(),
            argv: self.argv.clone(),
            cwd: self.cwd.clone(),
        }
    }

    /// Which planned images QEMU does not show (`vda on X (planned Y)`).
    fn wrong_images(&self, q: &mut crate::qmp::Qmp) -> crate::StepResult<Vec<String>> {
        let blocks = q.query_block_typed()?;
        Ok(self
            .images
            .iter()
            .filter_map(
                |BoundDisk {
                     target,
                     path: image,
                 }| {
                    let on = blocks
                        .iter()
                        .find(|b| b.target().as_deref() == Some(target.as_str()))
                        .and_then(|b| b.inserted.as_ref())
                        .map(|i| PathBuf::from(&i.file));
                    (on.as_deref() != Some(image.as_path())).then(|| {
                        format!(
                            "{target} on {} (planned {})",
                            on.map(|p| p.display().to_string())
                                .unwrap_or_else(|| "nothing".into()),
                            image.display()
                        )
                    })
                },
            )
            .collect())
    }

    fn step_err(&self, e: impl std::fmt::Display) -> StepError {
        StepError::Command {
            program: self.program.display().to_string(),
            path: self.qmp.clone(),
            message: e.to_string(),
        }
    }

    /// Start QEMU (paused: `-S` is in the argv) and return its pid once
    /// its monitor answers and shows the planned images. On failure
    /// nothing is left running (QEMU quit or killed, pidfile removed).
    pub fn start(&self) -> Result<u32, LaunchError> {
        if let Some(dir) = self.pidfile.parent() {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(LaunchError::Io {
                        op: "create",
                        path: dir.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let (mut child, log_from) = spawn(&self.planned(), &self.log)?;
        let pid = child.id();
        let fail = |child: &mut Child, e: LaunchError| {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.pidfile);
            e
        };
        if let Err(source) = write_pidfile(&self.pidfile, pid) {
            return Err(fail(
                &mut child,
                LaunchError::Io {
                    op: "write",
                    path: self.pidfile.clone(),
                    source,
                },
            ));
        }
        vsnap_journal::failpoint::hit("step.qemu-launch.spawned");
        let mut q = match wait_monitor(&mut child, &self.qmp, (&self.log, log_from), MONITOR_WAIT) {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut child, e)),
        };
        match self.wrong_images(&mut q) {
            Ok(w) if w.is_empty() => {}
            Ok(w) => {
                let _ = q.quit();
                return Err(fail(&mut child, LaunchError::WrongImages(w.join(", "))));
            }
            Err(e) => return Err(fail(&mut child, LaunchError::Monitor(e))),
        }
        // Reap it if it exits while this process lives (a service);
        // otherwise init does.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }

    /// The step's apply: [`Launch::start`] unless the probe finds it done.
    /// Another QEMU on the monitor (probe Unknown) is an error: a second
    /// QEMU would take its socket over.
    pub fn apply(&self) -> crate::StepResult<()> {
        match self.probe()? {
            crate::Probe::Applied => Ok(()),
            crate::Probe::Unknown(why) => {
                Err(StepError::Invalid(format!("not starting QEMU: {why}")))
            }
            crate::Probe::NotApplied => self.start().map(drop).map_err(|e| self.step_err(e)),
        }
    }

    /// Applied: a QEMU answers on the monitor and shows every planned
    /// image. NotApplied: none answers and the process the pidfile names
    /// is not alive. Unknown: a QEMU that shows other images. A process
    /// the pidfile names whose monitor does not answer yet is waited for
    /// (at most [`MONITOR_WAIT`]).
    pub fn probe(&self) -> crate::StepResult<crate::Probe> {
        use crate::Probe;
        let deadline = Instant::now() + MONITOR_WAIT;
        loop {
            let ours = pid_from_file(&self.pidfile);
            match crate::qmp::Qmp::connect(&self.qmp, Duration::from_secs(5)) {
                Ok(mut q) => {
                    let wrong = self.wrong_images(&mut q)?;
                    return Ok(if wrong.is_empty() {
                        Probe::Applied
                    } else {
                        Probe::Unknown(format!(
                            "a QEMU answers on {} on other images: {}",
                            self.qmp.display(),
                            wrong.join(", ")
                        ))
                    });
                }
                Err(StepError::QmpNoSocket { .. } | StepError::QmpConnect { .. }) => {
                    if ours.is_none() {
                        return Ok(Probe::NotApplied);
                    }
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Ok(Probe::Unknown(format!(
                    "QEMU {} (pidfile {}) runs but its monitor {} has not answered for {} s",
                    ours.unwrap_or(0),
                    self.pidfile.display(),
                    self.qmp.display(),
                    MONITOR_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The step's undo: the QEMU this launch started (the pidfile's
    /// process) quits, or is killed; the pidfile goes. Nothing else is
    /// touched (another process on the monitor is not ours).
    pub fn undo(&self) -> crate::StepResult<()> {
        if let Some(pid) = pid_from_file(&self.pidfile) {
            end_process(Some(&self.qmp), pid).map_err(|e| StepError::Io {
                op: "stop QEMU",
                path: self.pidfile.clone(),
                source: e,
            })?;
        }
        match std::fs::remove_file(&self.pidfile) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StepError::Io {
                op: "remove",
                path: self.pidfile.clone(),
                source,
            }),
        }
    }
}

/// The first bytes of QEMU's migration stream (a memory state file).
pub const QEVM_MAGIC: &[u8; 4] = b"QEVM";

/// Whether `path` is a memory state file: a regular file (not followed
/// through a link) that starts with QEMU's migration magic.
pub fn is_memory_file(path: &Path) -> io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Ok(false);
    }
    let mut magic = [0u8; 4];
    Ok(f.read_exact(&mut magic).is_ok() && &magic == QEVM_MAGIC)
}

/// The QEMU on `qmp` (started with `-incoming defer`) loads the memory
/// state in `path`: the file opened read-only (no link followed), handed
/// over with `getfd` as `fdname`, `migrate-incoming fd:<fdname>`, then
/// `query-migrate` until `completed` (bounded by
/// [`crate::live::JOB_TIMEOUT`]). The guest stays paused (`-S`). Done
/// already (probe [`migrate_incoming_probe`] Applied): nothing is done.
pub fn migrate_incoming(qmp: &Path, fdname: &str, path: &Path) -> crate::StepResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if migrate_incoming_probe(qmp)? == crate::Probe::Applied {
        return Ok(());
    }
    let mut q = crate::live::qmp(qmp)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StepError::Io {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
    // A name left by a process that died before its migrate took it.
    let _ = q.closefd(fdname);
    q.getfd(fdname, &file)?;
    drop(file);
    vsnap_journal::failpoint::hit("step.migrate-incoming.before");
    q.execute(
        "migrate-incoming",
        serde_json::json!({ "uri": format!("fd:{fdname}") }),
    )?;
    let deadline = Instant::now() + crate::live::JOB_TIMEOUT;
    loop {
        let (status, err) = q.query_migrate()?;
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(StepError::Invalid(format!(
                    "QEMU could not load the memory state {}: migration {status}: {}",
                    path.display(),
                    err.unwrap_or_else(|| "no reason given (see the domain's QEMU log)".into())
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(StepError::Invalid(format!(
                    "QEMU has not loaded the memory state {} after {} s (migration {status})",
                    path.display(),
                    crate::live::JOB_TIMEOUT.as_secs()
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Applied: the incoming migration completed (QEMU is out of `inmigrate`).
/// NotApplied: QEMU still waits for it, or no QEMU answers (the launch's
/// undo ends whatever is left). Unknown: a migration under way or failed.
pub fn migrate_incoming_probe(qmp: &Path) -> crate::StepResult<crate::Probe> {
    use crate::Probe;
    let mut q = match crate::live::qmp(qmp) {
        Ok(q) => q,
        Err(StepError::QmpNoSocket { .. } | StepError::QmpConnect { .. }) => {
            return Ok(Probe::NotApplied)
        }
        Err(e) => return Err(e),
    };
    let (status, _) = q.query_migrate()?;
    let (_, run) = q.query_status()?;
    Ok(match (status.as_str(), run.as_str()) {
        ("completed", r) if r != "inmigrate" => Probe::Applied,
        ("none" | "setup", "inmigrate") => Probe::NotApplied,
        (m, r) => Probe::Unknown(format!("QEMU's incoming migration is {m} (run state {r})")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], disks: &[(&str, &str)]) -> LaunchSpec {
        LaunchSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: "/work".into(),
            disks: disks
                .iter()
                .map(|(t, p)| BoundDisk {
                    target: t.to_string(),
                    path: p.into(),
                })
                .collect(),
        }
    }

    fn disk(t: &str, image: &str, format: Format) -> DiskImage {
        DiskImage {
            target: t.into(),
            image: image.into(),
            format,
        }
    }

    const QMP: &str = "/run/q.sock";
    const RUN: StartMode = StartMode {
        paused: false,
        incoming: false,
    };

    fn plan(
        argv: &[&str],
        bound: &[(&str, &str)],
        disks: &[DiskImage],
    ) -> Result<Vec<String>, ArgvError> {
        let mut a = vec!["/bin/sh", "-qmp", "unix:/run/q.sock,server=on,wait=off"];
        a.extend_from_slice(argv);
        plan_argv(&spec(&a, bound), disks, Path::new(QMP), RUN).map(|p| p.argv[3..].to_vec())
    }

    /// The table: each recorded form, and what it becomes when vda moves
    /// to /new/o.qcow2 (qcow2).
    #[test]
    fn rewrites_every_form_it_knows() {
        let to = [disk("vda", "/new/o.qcow2", Format::Qcow2)];
        let b = [("vda", "/vm/a.raw")];
        #[rustfmt::skip]
        let table: &[(&[&str], &[&str])] = &[
            (&["-drive", "file=/vm/a.raw,format=raw,if=virtio"],
             &["-drive", "file=/new/o.qcow2,format=qcow2,if=virtio", "-S"]),
            // relative to the working directory, no format given
            (&["-drive", "if=none,id=vda,file=../vm/a.raw"],
             &["-drive", "if=none,id=vda,file=/new/o.qcow2,format=qcow2", "-S"]),
            // nested protocol keys
            (&["-drive", "file.driver=file,file.filename=/vm/a.raw,format=raw,id=vda"],
             &["-drive", "file.driver=file,file.filename=/new/o.qcow2,format=qcow2,id=vda", "-S"]),
            // -blockdev key=value, protocol and format nodes
            (&["-blockdev", "driver=file,filename=/vm/a.raw,node-name=vda-file", "-blockdev", "driver=raw,file=vda-file,node-name=vda", "-device", "virtio-blk-pci,drive=vda"],
             &["-blockdev", "driver=file,filename=/new/o.qcow2,node-name=vda-file", "-blockdev", "driver=qcow2,file=vda-file,node-name=vda", "-device", "virtio-blk-pci,drive=vda", "-S"]),
            // -blockdev key=value, one node with nested file
            (&["-blockdev", "driver=raw,node-name=vda,file.driver=file,file.filename=/vm/a.raw"],
             &["-blockdev", "driver=qcow2,node-name=vda,file.driver=file,file.filename=/new/o.qcow2", "-S"]),
            // -blockdev JSON, nested
            (&["-blockdev", r#"{"driver":"raw","node-name":"vda","file":{"driver":"file","filename":"/vm/a.raw"}}"#],
             &["-blockdev", r#"{"driver":"qcow2","file":{"driver":"file","filename":"/new/o.qcow2"},"node-name":"vda"}"#, "-S"]),
            // -blockdev JSON, two nodes
            (&["-blockdev", r#"{"driver":"file","filename":"/vm/a.raw","node-name":"f"}"#, "-blockdev", r#"{"driver":"raw","file":"f","node-name":"vda"}"#],
             &["-blockdev", r#"{"driver":"file","filename":"/new/o.qcow2","node-name":"f"}"#, "-blockdev", r#"{"driver":"qcow2","file":"f","node-name":"vda"}"#, "-S"]),
            // vsnap's own options replace the recorded ones; -append's value is not an option
            (&["-S", "-daemonize", "-incoming", "tcp:0:4444", "-append", "x -drive file=/vm/a.raw", "-drive", "file=/vm/a.raw,format=raw"],
             &["-append", "x -drive file=/vm/a.raw", "-drive", "file=/new/o.qcow2,format=qcow2", "-S"]),
            // a comma in the new path is doubled; other drives are left alone
            (&["-drive", "file=/iso/x.iso,media=cdrom", "-drive", "file=/vm/a.raw,format=raw"],
             &["-drive", "file=/iso/x.iso,media=cdrom", "-drive", "file=/new/o.qcow2,format=qcow2", "-S"]),
        ];
        for (argv, want) in table {
            let got = plan(argv, &b, &to).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(got, *want, "{argv:?}");
        }
        let comma = [disk("vda", "/new/a,b.qcow2", Format::Qcow2)];
        assert_eq!(
            plan(&["-drive", "file=/vm/a.raw,format=raw"], &b, &comma).unwrap(),
            ["-drive", "file=/new/a,,b.qcow2,format=qcow2", "-S"]
        );
    }

    #[test]
    fn paused_and_incoming_add_their_options() {
        let s = spec(
            &["/bin/sh", "-qmp", "unix:q.sock,server=on,wait=off", "-S"],
            &[],
        );
        let p = plan_argv(
            &s,
            &[],
            Path::new("/work/q.sock"),
            StartMode {
                paused: true,
                incoming: true,
            },
        )
        .unwrap();
        assert_eq!(
            p.argv,
            [
                "/bin/sh",
                "-qmp",
                "unix:q.sock,server=on,wait=off",
                "-S",
                "-incoming",
                "defer"
            ]
        );
        assert_eq!(p.program, Path::new("/bin/sh"));
        assert_eq!(p.cwd, Path::new("/work"));
    }

    /// Each form vsnap cannot rewrite is refused, naming the option.
    #[test]
    fn refuses_what_it_cannot_rewrite() {
        let to = [disk("vda", "/new/o.qcow2", Format::Qcow2)];
        let b = [("vda", "/vm/a.raw")];
        #[rustfmt::skip]
        let table: &[(&[&str], &str, &str)] = &[
            (&["-drive", "file=/vm/other.raw"], "disk vda", "no -drive file="),
            (&["-drive", "file=/vm/a.raw", "-drive", "file=/vm/a.raw,if=ide"], "-drive file=/vm/a.raw and -drive file=/vm/a.raw,if=ide", "given twice"),
            (&["-readconfig", "/etc/vm.cfg"], "-readconfig /etc/vm.cfg", "configuration file"),
            (&["-hda", "/vm/a.raw"], "-hda /vm/a.raw", "-drive file=PATH"),
            (&["/vm/a.raw"], "/vm/a.raw", "-drive file=PATH"),
            (&["-drive", "file=/vm/a.raw,backing.file.filename=/b"], "-drive file=/vm/a.raw,backing.file.filename=/b", "backing"),
            (&["-drive", "file=/vm/a.raw,format=vmdk"], "-drive file=/vm/a.raw,format=vmdk", "vmdk"),
            (&["-blockdev", "driver=file,filename=/vm/a.raw,node-name=f"], "-blockdev driver=file,filename=/vm/a.raw,node-name=f", "format node"),
            (&["-blockdev", "driver=qcow2,file.driver=file,file.filename=/vm/a.raw,backing=null"], "-blockdev driver=qcow2,file.driver=file,file.filename=/vm/a.raw,backing=null", "backing"),
            (&["-blockdev", "driver=nbd,server.path=/vm/a.raw"], "disk vda", "no -drive file="),
            (&["-drive", "file=json:{\"file\":{\"filename\":\"/vm/a.raw\"}}"], "-drive file=json:{\"file\":{\"filename\":\"/vm/a.raw\"}}", "json:"),
            (&["-blockdev", "{not json"], "-blockdev {not json", "JSON"),
            (&["-drive", "file=/vm/a.raw", "-snapshot"], "-snapshot", "temporary files"),
            (&["-drive", "file=/vm/a.raw", "-loadvm", "s1"], "-loadvm s1", "internal snapshot"),
            (&["-drive", "file=/vm/a.raw,snapshot=on"], "-drive file=/vm/a.raw,snapshot=on", "temporary file"),
        ];
        for (argv, option, why) in table {
            let e = plan(argv, &b, &to).unwrap_err();
            assert_eq!(e.option, *option, "{argv:?}: {e}");
            assert!(e.why.contains(why), "{argv:?}: {e}");
        }
        // The domain's monitor must be one the command line opens.
        let e = plan_argv(
            &spec(&["/bin/sh", "-qmp", "unix:/run/other.sock,server=on"], &[]),
            &[],
            Path::new(QMP),
            RUN,
        )
        .unwrap_err();
        assert_eq!(e.option, "-qmp");
        assert!(e.why.contains("/run/other.sock"), "{e}");
        // ... through -chardev and -mon too.
        let ok = spec(
            &[
                "/bin/sh",
                "-chardev",
                "socket,id=m,path=/run/q.sock,server=on,wait=off",
                "-mon",
                "chardev=m,mode=control",
            ],
            &[],
        );
        plan_argv(&ok, &[], Path::new(QMP), RUN).unwrap();
        // A program that does not exist.
        let e = plan_argv(
            &spec(&["no-such-qemu-x", "-qmp", "unix:/run/q.sock"], &[]),
            &[],
            Path::new(QMP),
            RUN,
        )
        .unwrap_err();
        assert_eq!(e.option, "no-such-qemu-x");
        // A disk the spec was not recorded with.
        let e = plan(&["-drive", "file=/vm/a.raw"], &[], &to).unwrap_err();
        assert_eq!(e.option, "disk vda");
    }

    /// This test's own process: its argv and working directory as /proc
    /// gives them, an empty argument kept.
    #[test]
    fn reads_a_process_argv_and_cwd() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 30; :", "a b", ""])
            .current_dir("/tmp")
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc shows the forked test process.
        let t0 = Instant::now();
        let got = loop {
            let got = process_argv_cwd(child.id());
            let execd = got
                .as_ref()
                .is_ok_and(|(a, _)| a.first().map(String::as_str) == Some("/bin/sh"));
            if execd || t0.elapsed() > Duration::from_secs(10) {
                break got;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        let (argv, cwd) = got.unwrap();
        assert_eq!(argv, ["/bin/sh", "-c", "sleep 30; :", "a b", ""]);
        assert_eq!(cwd, Path::new("/tmp"));
    }

    #[test]
    fn a_pidfile_names_a_live_process_only_with_its_start_time() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.pid");
        let me = std::process::id();
        write_pidfile(&f, me).unwrap();
        assert_eq!(pid_from_file(&f), Some(me));
        // Another start time: a reused pid is not taken for it.
        std::fs::write(&f, format!("{me} 1\n")).unwrap();
        assert_eq!(pid_from_file(&f), None);
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(pid_from_file(&f), None);
    }

    #[test]
    fn kv_round_trips_commas() {
        let kv = parse_kv("file=/a,,b,if=none,server");
        assert_eq!(
            kv,
            [
                ("file".to_string(), Some("/a,b".to_string())),
                ("if".to_string(), Some("none".to_string())),
                ("server".to_string(), None)
            ]
        );
        assert_eq!(write_kv(&kv), "file=/a,,b,if=none,server");
    }
}
