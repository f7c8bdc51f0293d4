//! Helpers for vsnap's black-box tests: the crash suite (`tests/crash.rs`)
//! and any other test that drives the `vsnap` and `vsnap-recover` binaries
//! (bad-input tests, for example).
//!
//! * [`Bins`] finds the binaries under test (`$VSNAP_BIN_DIR`, else
//!   `<workspace>/target/debug`) and can require that they were built with
//!   crash points (`cargo build -p vsnap-cli --features vsnap-cli/failpoints`).
//! * [`run`] runs one of them and returns its status, stdout and stderr
//!   ([`Run`]); [`Inject`] says whether to list its crash points
//!   (`VSNAP_FAILPOINT_LOG`) or kill it at one (`VSNAP_CRASH_AT`).
//! * [`Fixture`] is a scenario's world: a directory with one disk image of
//!   [`IMAGE_SIZE`] bytes holding known byte patterns in [`REGIONS`]
//!   regions, a state directory, and a [`Model`] of what the image and every
//!   snapshot must contain. Its methods write patterns (qemu-io) and take,
//!   revert and delete snapshots through the CLI, keeping the model.
//! * [`inspect`] opens the engine on a state directory (after the CLI
//!   processes are done: one process at a time holds it) and returns the
//!   catalog state ([`CatalogState`]) and `Engine::vol_check`'s report.
//! * [`check_content`] reads the regions back and names every mismatch.
//! * [`listing`], [`copy_tree`], [`replace_tree`]: directory snapshots for
//!   "nothing changed" checks and for laying the same fixture anew quickly.
//! * [`BtrfsLoop`]: a btrfs filesystem on a loop file, unmounted on drop.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
pub use vsnap_engine::CheckReport;
use vsnap_engine::Engine;
pub use vsnap_engine::{Format, SnapKind};
use vsnap_steps::qemu_img;

/// SIGKILL's number on Linux (what a crash point kills with).
pub const SIGKILL: i32 = 9;

/// Number of data regions of a test image.
pub const REGIONS: usize = 4;
/// Length of one region.
pub const REGION_LEN: u64 = 64 << 10;
/// Region `r` starts at `r * REGION_STRIDE`.
pub const REGION_STRIDE: u64 = 1 << 20;
/// Virtual size of a test image.
pub const IMAGE_SIZE: u64 = 4 << 20;

/// The byte pattern of every region of an image; `0` is "never written"
/// (reads as zeros).
pub type Content = [u8; REGIONS];

/// What a fresh fixture's image holds.
pub const INITIAL: Content = [0x10, 0x11, 0x00, 0x13];

/// Every pattern a fixture ever writes (used to say what a mismatching
/// region holds instead).
fn known_patterns() -> impl Iterator<Item = u8> {
    [0x00u8, 0x10, 0x11, 0x12, 0x13]
        .into_iter()
        .chain(0x21..=0x3f)
}

/// Byte offset of region `r`.
pub fn region_offset(r: usize) -> u64 {
    r as u64 * REGION_STRIDE
}

/// Show a content vector as `[10 11 00 13]`.
pub fn show_content(c: &Content) -> String {
    let v: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
    format!("[{}]", v.join(" "))
}

/// The binaries under test.
#[derive(Clone, Debug)]
pub struct Bins {
    pub dir: PathBuf,
    pub vsnap: PathBuf,
    pub recover: PathBuf,
}

/// The workspace's root directory (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&p).unwrap_or(p)
}

impl Bins {
    /// `$VSNAP_BIN_DIR`, else `<workspace>/target/debug`; both binaries
    /// must be there.
    pub fn locate() -> Result<Bins, String> {
        let dir = match std::env::var_os("VSNAP_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => workspace_root().join("target/debug"),
        };
        let bins = Bins {
            vsnap: dir.join("vsnap"),
            recover: dir.join("vsnap-recover"),
            dir,
        };
        for b in [&bins.vsnap, &bins.recover] {
            if !b.is_file() {
                return Err(format!(
                    "{} is missing: build the binaries under test with \
                     `cargo build -p vsnap-cli --features vsnap-cli/failpoints` \
                     (or point VSNAP_BIN_DIR at them)",
                    b.display()
                ));
            }
        }
        Ok(bins)
    }

    /// Run each binary once with `VSNAP_FAILPOINT_LOG` on a trivial command
    /// (in `scratch`, a directory of our own) and require a non-empty log:
    /// binaries built without the `failpoints` feature log nothing.
    pub fn require_failpoints(&self, scratch: &Path) -> Result<(), String> {
        let state = scratch.join("failpoint-probe-state");
        for (prog, args) in [
            (
                &self.vsnap,
                vec![
                    OsString::from("--state-dir"),
                    state.clone().into(),
                    "plan".into(),
                    "list".into(),
                ],
            ),
            (
                &self.recover,
                vec![OsString::from("--state-dir"), state.clone().into()],
            ),
        ] {
            let log = scratch.join("failpoint-probe.log");
            let _ = std::fs::remove_file(&log);
            let r = run(prog, &args, &Inject::Log(log.clone()));
            if !r.success() {
                return Err(format!("probing for crash points: {}", r.describe()));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.trim().is_empty() {
                return Err(format!(
                    "{} was built without crash points (VSNAP_FAILPOINT_LOG stayed empty): rebuild with \
                     `cargo build -p vsnap-cli --features vsnap-cli/failpoints`",
                    prog.display()
                ));
            }
        }
        let _ = std::fs::remove_dir_all(&state);
        Ok(())
    }
}

/// Crash-point control for one run of a binary.
#[derive(Clone, Debug, Default)]
pub enum Inject {
    /// No crash point is armed and none is logged.
    #[default]
    None,
    /// `VSNAP_CRASH_AT=<spec>`: `name`, `name#N` or `*#N`.
    CrashAt(String),
    /// `VSNAP_FAILPOINT_LOG=<file>`: every point hit is appended to it.
    Log(PathBuf),
}

/// How one run of a binary ended.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, when it exited (not killed).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Died by SIGKILL (as a crash point kills).
    pub fn killed(&self) -> bool {
        self.status.signal() == Some(SIGKILL)
    }

    /// One paragraph for a report: the command, how it ended, its output.
    pub fn describe(&self) -> String {
        let how = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exited {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            _ => format!("ended with {}", self.status),
        };
        let mut s = format!("`{}` {how}", self.cmdline);
        for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let t = text.trim();
            if !t.is_empty() {
                s.push_str(&format!("; {name}: {}", t.replace('\n', " | ")));
            }
        }
        s
    }
}

/// Run `program args...` to its end (no timeout: vsnap never waits for
/// anything a test does not give it), with the crash-point variables set
/// only as `inject` says (inherited ones are removed). Panics when the
/// program cannot be started at all: a harness error, not a finding.
pub fn run(program: &Path, args: &[OsString], inject: &Inject) -> Run {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("VSNAP_CRASH_AT")
        .env_remove("VSNAP_FAILPOINT_LOG")
        .env_remove("VSNAP_STATE_DIR")
        .env("LC_ALL", "C");
    match inject {
        Inject::None => {}
        Inject::CrashAt(spec) => {
            cmd.env("VSNAP_CRASH_AT", spec);
        }
        Inject::Log(file) => {
            cmd.env("VSNAP_FAILPOINT_LOG", file);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let name = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy();
    let mut cmdline = name.into_owned();
    for a in args {
        cmdline.push(' ');
        cmdline.push_str(&a.to_string_lossy());
    }
    if let Inject::CrashAt(spec) = inject {
        cmdline = format!("VSNAP_CRASH_AT={spec} {cmdline}");
    }
    Run {
        cmdline,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The crash points of a `VSNAP_FAILPOINT_LOG`, in order, each as the
/// `name#N` that `VSNAP_CRASH_AT` takes (N counts the hits of that name).
pub fn expand_points(log: &str) -> Vec<String> {
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for name in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let n = seen.entry(name).or_insert(0);
        *n += 1;
        out.push(format!("{name}#{n}"));
    }
    out
}

/// What the image and each snapshot must contain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// The image's regions now.
    pub image: Content,
    /// Every snapshot ever taken in this fixture, by name: its regions at
    /// the moment it was taken (a snapshot's data never changes).
    pub snaps: BTreeMap<String, Content>,
}

/// A scenario's world: `root/disk/<image>` and `root/state`.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub bins: Bins,
    pub root: PathBuf,
    /// Where the image and its snapshot files live.
    pub disk_dir: PathBuf,
    pub image: PathBuf,
    pub state_dir: PathBuf,
    pub model: Model,
    /// Writes made so far by [`Fixture::write_next`].
    pub generation: u8,
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

impl Fixture {
    /// Lay a new fixture in `root` (created if missing): a `format` image
    /// `root/disk/<image_name>` of [`IMAGE_SIZE`] bytes with [`INITIAL`]
    /// written, and an empty state directory `root/state`. `root` should be
    /// canonical (the catalog names images by canonical path).
    pub fn create(
        bins: &Bins,
        root: &Path,
        image_name: &str,
        format: Format,
    ) -> Result<Fixture, String> {
        let disk_dir = root.join("disk");
        let state_dir = root.join("state");
        std::fs::create_dir_all(&disk_dir)
            .map_err(|e| format!("mkdir {}: {e}", disk_dir.display()))?;
        let image = disk_dir.join(image_name);
        qemu_img::create(&image, format, IMAGE_SIZE).map_err(|e| e.to_string())?;
        let mut fx = Fixture {
            bins: bins.clone(),
            root: root.to_path_buf(),
            disk_dir,
            image,
            state_dir,
            model: Model {
                image: [0; REGIONS],
                snaps: BTreeMap::new(),
            },
            generation: 0,
        };
        for (r, &p) in INITIAL.iter().enumerate() {
            if p != 0 {
                fx.write(r, p)?;
            }
        }
        Ok(fx)
    }

    /// Write pattern `pattern` over region `region` of the image (qemu-io).
    pub fn write(&mut self, region: usize, pattern: u8) -> Result<(), String> {
        write_region(&self.image, region, pattern)?;
        self.model.image[region] = pattern;
        Ok(())
    }

    /// Write the next new pattern (`0x21`, `0x22`, ...) over the next
    /// region in turn: called after each snapshot so that every snapshot's
    /// data differs from the others' and from the image's.
    pub fn write_next(&mut self) -> Result<(), String> {
        self.generation += 1;
        let g = self.generation;
        self.write((usize::from(g) - 1) % REGIONS, 0x20 + g)
    }

    /// `vsnap --state-dir <state> ARGS...`.
    pub fn vsnap<S: AsRef<OsStr>>(&self, args: &[S], inject: &Inject) -> Run {
        let mut a = vec![os("--state-dir"), os(&self.state_dir)];
        a.extend(args.iter().map(os));
        run(&self.bins.vsnap, &a, inject)
    }

    /// `vsnap-recover --state-dir <state>`.
    pub fn recover(&self, inject: &Inject) -> Run {
        run(
            &self.bins.recover,
            &[os("--state-dir"), os(&self.state_dir)],
            inject,
        )
    }

    /// The CLI arguments of a snapshot creation.
    pub fn create_args(&self, name: &str, kind: SnapKind) -> Vec<OsString> {
        vec![
            os("vol"),
            os("snapshot"),
            os("create"),
            os(&self.image),
            os(name),
            os("--kind"),
            os(kind.as_str()),
        ]
    }

    /// The CLI arguments of a revert.
    pub fn revert_args(&self, name: &str) -> Vec<OsString> {
        vec![
            os("vol"),
            os("snapshot"),
            os("revert"),
            os(&self.image),
            os(name),
        ]
    }

    /// The CLI arguments of a delete.
    pub fn delete_args(&self, name: &str, children: bool) -> Vec<OsString> {
        let mut a = vec![
            os("vol"),
            os("snapshot"),
            os("delete"),
            os(&self.image),
            os(name),
        ];
        if children {
            a.push(os("--children"));
        }
        a
    }

    fn must(&self, r: Run) -> Result<Run, String> {
        if r.success() {
            Ok(r)
        } else {
            Err(r.describe())
        }
    }

    /// Take a snapshot through the CLI (must succeed); the model records
    /// the image's data as the snapshot's.
    pub fn snapshot(&mut self, name: &str, kind: SnapKind) -> Result<(), String> {
        self.must(self.vsnap(&self.create_args(name, kind), &Inject::None))?;
        self.model.snaps.insert(name.to_string(), self.model.image);
        Ok(())
    }

    /// Revert through the CLI (must succeed); the model's image becomes the
    /// snapshot's data.
    pub fn revert(&mut self, name: &str) -> Result<(), String> {
        self.must(self.vsnap(&self.revert_args(name), &Inject::None))?;
        self.model.image = *self
            .model
            .snaps
            .get(name)
            .ok_or_else(|| format!("the model has no snapshot {name:?}"))?;
        Ok(())
    }

    /// Delete through the CLI (must succeed). The model keeps the data of
    /// deleted snapshots (it is looked up by name only).
    pub fn delete(&mut self, name: &str, children: bool) -> Result<(), String> {
        self.must(self.vsnap(&self.delete_args(name, children), &Inject::None))?;
        Ok(())
    }

    /// [`inspect`] this fixture's volume.
    pub fn inspect(&self) -> Result<Inspection, String> {
        inspect(&self.state_dir, &self.image)
    }

    /// [`catalog`] of this fixture's volume.
    pub fn catalog(&self) -> Result<CatalogState, String> {
        catalog(&self.state_dir, &self.image)
    }

    /// [`check_content`] of the image against `expected`.
    pub fn check_image(&self, expected: &Content) -> Vec<String> {
        check_content(&self.image, expected)
    }

    /// `text` with the fixture's root directory (and the `/` after it)
    /// removed from every path in it, for shorter messages.
    pub fn short(&self, text: &str) -> String {
        text.replace(&format!("{}/", self.root.display()), "")
    }
}

/// Write `pattern` over region `region` of `image` (its format detected).
pub fn write_region(image: &Path, region: usize, pattern: u8) -> Result<(), String> {
    let fmt = qemu_img::detect_format(image).map_err(|e| e.to_string())?;
    qemu_img::io_write_pattern(image, fmt, region_offset(region), REGION_LEN, pattern)
        .map_err(|e| e.to_string())
}

/// Whether each region of `image` holds its `expected` pattern, read by
/// one read-only `qemu-io` with one `read -P` command per region (qemu-io
/// goes on after a failed verification: each region's result is found by
/// its offset in the output).
pub fn read_regions(
    image: &Path,
    fmt: Format,
    expected: &Content,
) -> Result<[bool; REGIONS], String> {
    let mut cmd = qemu_img::child_command("qemu-io");
    cmd.args(["-f", fmt.as_str(), "-r"]);
    for (r, &want) in expected.iter().enumerate() {
        cmd.arg("-c").arg(format!(
            "read -P 0x{want:02x} {} {REGION_LEN}",
            region_offset(r)
        ));
    }
    cmd.arg(qemu_img::path_arg(image));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run qemu-io: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut ok = [false; REGIONS];
    for (r, slot) in ok.iter_mut().enumerate() {
        let off = region_offset(r);
        let good = format!("read {REGION_LEN}/{REGION_LEN} bytes at offset {off}\n");
        let bad = format!("Pattern verification failed at offset {off},");
        if stdout.contains(&bad) || stderr.contains(&bad) {
            *slot = false;
        } else if stdout.contains(&good) {
            *slot = true;
        } else {
            return Err(format!(
                "qemu-io on {} ({}) said neither that region {r} was read nor that it differed: {} {}",
                image.display(),
                out.status,
                stdout.trim(),
                stderr.trim()
            ));
        }
    }
    Ok(ok)
}

/// Read every region of `image` back (qemu-io, read-only) and return one
/// line per region that does not hold its `expected` pattern, naming what
/// it holds instead where that is one of the test patterns.
pub fn check_content(image: &Path, expected: &Content) -> Vec<String> {
    let fmt = match qemu_img::detect_format(image) {
        Ok(f) => f,
        Err(e) => return vec![format!("cannot read {}: {e}", image.display())],
    };
    let ok = match read_regions(image, fmt, expected) {
        Ok(ok) => ok,
        Err(e) => return vec![e],
    };
    let mut out = Vec::new();
    for (r, &want) in expected.iter().enumerate() {
        if ok[r] {
            continue;
        }
        let off = region_offset(r);
        // Slow path, only on a mismatch: what is there instead?
        let found = known_patterns()
            .filter(|&p| p != want)
            .find(|&p| qemu_img::io_read_pattern(image, fmt, off, REGION_LEN, p).unwrap_or(false));
        let found = match found {
            Some(p) => format!("0x{p:02x}"),
            None => "none of the test patterns".into(),
        };
        out.push(format!(
            "{}: region {r} (offset {off}) should hold 0x{want:02x}, holds {found}",
            image.display()
        ));
    }
    out
}

/// One snapshot as the catalog records it, less what legitimately differs
/// between runs (creation time, description).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapState {
    pub name: String,
    pub kind: SnapKind,
    pub parent: Option<String>,
    pub file: Option<PathBuf>,
    pub format: Format,
    pub seq: u64,
}

/// The catalog's view of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogState {
    /// Whether the catalog has a volume record for the image.
    pub known: bool,
    pub current: Option<String>,
    pub next_seq: u64,
    /// Oldest first.
    pub snaps: Vec<SnapState>,
}

impl CatalogState {
    pub fn names(&self) -> Vec<&str> {
        self.snaps.iter().map(|s| s.name.as_str()).collect()
    }

    /// One line: `s1 (internal) <- s2 (internal); current s2`.
    pub fn summary(&self) -> String {
        if !self.known && self.snaps.is_empty() {
            return "no volume record, no snapshot".into();
        }
        let snaps: Vec<String> = self
            .snaps
            .iter()
            .map(|s| {
                let parent = s
                    .parent
                    .as_deref()
                    .map(|p| format!(", parent {p}"))
                    .unwrap_or_default();
                format!("{} ({}{parent})", s.name, s.kind)
            })
            .collect();
        format!(
            "snapshots [{}]; current {}; next seq {}",
            snaps.join(", "),
            self.current.as_deref().unwrap_or("-"),
            self.next_seq
        )
    }
}

/// The catalog's view of `image` in `state_dir` (the engine opened
/// without recovery, closed on return). No vsnap process may hold the
/// state directory meanwhile.
pub fn catalog(state_dir: &Path, image: &Path) -> Result<CatalogState, String> {
    let engine =
        Engine::open_without_recovery(state_dir).map_err(|e| format!("opening the engine: {e}"))?;
    read_catalog(&engine, image)
}

fn read_catalog(engine: &Engine, image: &Path) -> Result<CatalogState, String> {
    let canon = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let rec = vsnap_engine::testing::volume_record(engine, &canon)
        .map_err(|e| format!("reading the catalog: {e}"))?;
    let snaps = vsnap_engine::testing::volume_snapshots(engine, &canon)
        .map_err(|e| format!("reading the catalog: {e}"))?;
    Ok(CatalogState {
        known: rec.is_some(),
        current: rec.as_ref().and_then(|r| r.current.clone()),
        next_seq: rec.as_ref().map_or(0, |r| r.next_seq),
        snaps: snaps
            .into_iter()
            .map(|s| SnapState {
                name: s.name,
                kind: s.kind,
                parent: s.parent,
                file: s.file,
                format: s.format,
                seq: s.seq,
            })
            .collect(),
    })
}

/// What [`inspect`] saw.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub catalog: CatalogState,
    /// `Engine::vol_check`: DESIGN.md section 5's volume invariants.
    pub check: CheckReport,
}

/// Open the engine on `state_dir` **without** recovery (so that what a
/// `vsnap-recover` left is seen as it is), read the catalog of `image`
/// and run `Engine::vol_check(image)`; the engine is closed on return.
/// No vsnap process may hold the state directory meanwhile.
pub fn inspect(state_dir: &Path, image: &Path) -> Result<Inspection, String> {
    let engine =
        Engine::open_without_recovery(state_dir).map_err(|e| format!("opening the engine: {e}"))?;
    let catalog = read_catalog(&engine, image)?;
    let canon = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let check = engine
        .vol_check(&canon)
        .map_err(|e| format!("vol_check: {e}"))?;
    Ok(Inspection { catalog, check })
}

/// Every file and directory under `dir`, by path relative to it (a
/// directory's ends with `/`), with its size (0 for directories).
pub type Listing = BTreeMap<String, u64>;

/// [`Listing`] of `dir`, recursively.
pub fn listing(dir: &Path) -> Result<Listing, String> {
    fn walk(base: &Path, dir: &Path, out: &mut Listing) -> Result<(), String> {
        let rd = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("listing {}: {e}", dir.display()))?;
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("stat {}: {e}", path.display()))?;
            let rel = path
                .strip_prefix(base)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                out.insert(format!("{rel}/"), 0);
                walk(base, &path, out)?;
            } else {
                out.insert(rel, meta.len());
            }
        }
        Ok(())
    }
    let mut out = Listing::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// What differs between two listings, one line each.
pub fn diff_listing(before: &Listing, after: &Listing) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push(format!("{k} ({v} bytes) disappeared")),
            Some(w) if w != v => out.push(format!("{k} changed size: {v} -> {w} bytes")),
            Some(_) => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            out.push(format!("{k} ({v} bytes) appeared"));
        }
    }
    out
}

/// Copy the tree `src` to `dst` (which must not exist): directories with
/// their modes, regular files (`std::fs::copy`: a reflink on btrfs), hard
/// links kept as hard links, symlinks as symlinks.
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    fn walk(
        src: &Path,
        dst: &Path,
        links: &mut BTreeMap<(u64, u64), PathBuf>,
    ) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(src)?;
        std::fs::create_dir(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            let (s, d) = (e.path(), dst.join(e.file_name()));
            let m = std::fs::symlink_metadata(&s)?;
            let ft = m.file_type();
            if ft.is_dir() {
                walk(&s, &d, links)?;
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&s)?, &d)?;
            } else if m.nlink() > 1 && links.contains_key(&(m.dev(), m.ino())) {
                std::fs::hard_link(&links[&(m.dev(), m.ino())], &d)?;
            } else {
                std::fs::copy(&s, &d)?;
                if m.nlink() > 1 {
                    links.insert((m.dev(), m.ino()), d);
                }
            }
        }
        std::fs::set_permissions(dst, meta.permissions())
    }
    walk(src, dst, &mut BTreeMap::new())
}

/// Make `dst` an exact copy of `src`: remove it (if present), then
/// [`copy_tree`].
pub fn replace_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    copy_tree(src, dst)
}

/// A directory for test data under /var/tmp (a real disk, not tmpfs: fsync
/// and file cloning behave as in production), removed on drop.
pub fn scratch_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
}

/// A btrfs filesystem on a sparse loop file, mounted for the life of the
/// value: unmounted (and the file removed) on drop, also while a panic
/// unwinds.
pub struct BtrfsLoop {
    /// Where it is mounted.
    pub mount: PathBuf,
    file: PathBuf,
    mounted: bool,
}

fn sh(program: &str, args: &[&OsStr]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {:?} failed ({}): {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl BtrfsLoop {
    /// `truncate -s SIZE file; mkfs.btrfs -q file; mount -o loop file dir`
    /// with `file` and `dir` made in `parent`. Needs root and btrfs-progs
    /// (Debian package `btrfs-progs`): a missing `mkfs.btrfs` is an error.
    pub fn create(parent: &Path, size: u64) -> Result<BtrfsLoop, String> {
        let file = parent.join("btrfs.img");
        let mount = parent.join("btrfs");
        let f =
            std::fs::File::create(&file).map_err(|e| format!("create {}: {e}", file.display()))?;
        f.set_len(size)
            .map_err(|e| format!("truncate {}: {e}", file.display()))?;
        drop(f);
        let mkfs = ["/usr/sbin/mkfs.btrfs", "/sbin/mkfs.btrfs", "/usr/bin/mkfs.btrfs"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .ok_or("mkfs.btrfs not found: install btrfs-progs (apt-get install -y btrfs-progs); the reflink scenarios need btrfs")?;
        sh(mkfs, &["-q".as_ref(), file.as_os_str()])?;
        std::fs::create_dir(&mount).map_err(|e| format!("mkdir {}: {e}", mount.display()))?;
        sh(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                file.as_os_str(),
                mount.as_os_str(),
            ],
        )?;
        Ok(BtrfsLoop {
            mount,
            file,
            mounted: true,
        })
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = sh("umount", &[self.mount.as_os_str()]) {
                eprintln!("warning: {e}; unmounting lazily");
                let _ = sh("umount", &["-l".as_ref(), self.mount.as_os_str()]);
            }
            self.mounted = false;
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_numbered_per_name() {
        let log = "journal.opened\njournal.flushed\nrun.begun\njournal.flushed\n\n";
        assert_eq!(
            expand_points(log),
            vec![
                "journal.opened#1",
                "journal.flushed#1",
                "run.begun#1",
                "journal.flushed#2"
            ]
        );
    }

    #[test]
    fn listing_diff_names_changes() {
        let a: Listing = [("x".to_string(), 1), ("y".to_string(), 2)].into();
        let b: Listing = [("x".to_string(), 3), ("z".to_string(), 2)].into();
        let d = diff_listing(&a, &b);
        assert_eq!(d.len(), 3, "{d:?}");
    }

    #[test]
    fn copy_tree_keeps_hard_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a"), b"data").unwrap();
        std::fs::hard_link(src.join("a"), src.join("sub/b")).unwrap();
        let dst = t.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        let (a, b) = (
            std::fs::metadata(dst.join("a")).unwrap(),
            std::fs::metadata(dst.join("sub/b")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"data");
        replace_tree(&src, &dst).unwrap();
        assert_eq!(listing(&src).unwrap(), listing(&dst).unwrap());
    }
}
