//! A live disk-only snapshot, whole command, vsnap side by side with
//! libvirt (issue 9), in one run on the real test guest (guest/README.md):
//! for each disk count N (1, 4, 16) and chain depth D (1, 20), two guests
//! run at once, booted from the same kernel and initramfs with the same
//! memory and N virtio qcow2 disks, each disk a backing chain of D images:
//!
//! - libvirt's guest: a transient domain (`virsh create`), its QEMU started
//!   and driven by libvirtd (`<domain type='qemu'>` under TCG);
//! - vsnap's guest: `guest/run.sh --blockdev`, as `benches/pause.rs` boots
//!   it, attached with `vsnap domain attach`.
//!
//! Each guest has its own QEMU: libvirt keeps its own view of its QEMU's
//! block graph, so vsnap switching the disks of libvirt's QEMU (through a
//! second monitor added with `<qemu:commandline>`) would leave libvirt's
//! domain pointing at the old images, and the next libvirt measurement
//! would start from a graph libvirt does not know.
//!
//! Series, interleaved, the order rotating from one iteration to the next:
//!
//! | series          | the command timed (wall clock, whole process) |
//! |-----------------|-----------------------------------------------|
//! | libvirt         | `virsh -c URI snapshot-create-as DOM NAME --disk-only --atomic --no-metadata` (libvirtd already running) |
//! | vsnap           | `vsnap --state-dir S snapshot create DOM NAME --disk-only` (records the snapshot in vsnap's catalog) |
//! | vsnap no-meta   | `vsnap --state-dir S snapshot create DOM NAME --disk-only --atomic --no-metadata` (the same flags as virsh's) |
//!
//! Between two measurements, untimed, each guest is put back at depth D:
//! libvirt's with `virsh blockcommit DOM TARGET --active --pivot --shallow`
//! for every disk (the new overlay committed into the image below it, the
//! disk pivoted back to that image), vsnap's with QMP `block-commit` of the
//! new top into the boot-time top (`base-node`), `job-complete`, then
//! `blockdev-del` of the overlay node vsnap added; then the overlay files
//! are removed. The bench checks after every measurement that every disk
//! was switched, and after every commit-back that every disk is back on its
//! boot-time image (libvirt: `domblklist`; vsnap: `query-block` and the
//! exact set of boot-time nodes). Before each vsnap command the domain is
//! attached again (`vsnap domain undefine --snapshots-metadata`, `vsnap
//! domain attach`, untimed), since the commit-back leaves vsnap's catalog
//! pointing at the removed overlay.
//!
//! A chain of depth D: `d{k}.c0.qcow2` a blank 32 MiB qcow2, then
//! `d{k}.c{j}.qcow2` = `qemu-img create -f qcow2 -b d{k}.c{j-1}.qcow2 -F
//! qcow2` for j = 1..D-1; the guest's disk is the top, `d{k}.c{D-1}.qcow2`.
//! The disks are blank (no filesystem): the guests are idle.
//!
//! libvirt must be installed and its daemon running: the bench runs
//! `scripts/libvirt-setup.sh` first, which installs Debian's libvirt when
//! missing and starts virtlogd and libvirtd by hand when they do not answer
//! (a container without systemd); /etc/libvirt/qemu.conf stays as Debian
//! ships it (that script says why).
//!
//! Run: `cargo bench -p vsnap-cli --bench vs_libvirt`. Environment:
//! VSNAP_BENCH_ITERS (default 10), VSNAP_BENCH_WARMUP (default 1),
//! VSNAP_BENCH_DISKS (default 1,4,16), VSNAP_BENCH_DEPTHS (default 1,20),
//! VSNAP_BENCH_DIR (default /var/tmp), VSNAP_BENCH_LIBVIRT_URI (default
//! qemu:///system).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::live;

const DISK_SIZE: &str = "32M";
/// The guests' memory (guest/run.sh's default, which vsnap's guest gets).
const MEM_MB: usize = 256;

/// Wall time of a whole command (spawn to exit); panics if it fails.
fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    run(cmd);
    t.elapsed()
}

fn virsh(uri: &str) -> Command {
    let mut c = Command::new("virsh");
    c.args(["-q", "-c", uri]);
    c
}

/// libvirt's guest: a transient domain. Dropping it destroys the domain.
struct LvGuest {
    uri: String,
    name: String,
    console: PathBuf,
}

impl LvGuest {
    /// The domain XML: the same kernel, initramfs, kernel options, memory,
    /// machine (q35), firmware (qboot when QEMU ships it, as guest/run.sh),
    /// agent channel and disks as vsnap's guest; no USB, no balloon.
    fn create(uri: &str, name: &str, dir: &Path, disks: &[PathBuf], accel: &str) -> LvGuest {
        let guest = std::env::var_os("VSNAP_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/guest"));
        let qboot = Path::new("/usr/share/qemu/qboot.rom");
        let loader = if qboot.is_file() {
            format!("<loader type='rom'>{}</loader>", qboot.display())
        } else {
            String::new()
        };
        let console = dir.join("console.log");
        let mut devs = String::new();
        for (k, d) in disks.iter().enumerate() {
            devs += &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{}' bus='virtio'/></disk>\n",
                d.display(),
                target(k)
            );
        }
        let xml = format!(
            "<domain type='{dtype}'>\n<name>{name}</name>\n<memory unit='MiB'>{MEM_MB}</memory>\n<vcpu>1</vcpu>\n\
             <os><type arch='x86_64' machine='q35'>hvm</type>{loader}\
             <kernel>{kernel}</kernel><initrd>{initrd}</initrd>\
             <cmdline>console=ttyS0 quiet panic=-1 cryptomgr.notests</cmdline></os>\n\
             <features><acpi/></features>\n\
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\n\
             <devices>\n{devs}\
             <controller type='usb' model='none'/>\n\
             <serial type='file'><source path='{console}'/><target port='0'/></serial>\n\
             <channel type='unix'><source mode='bind' path='{qga}'/>\
             <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n\
             <memballoon model='none'/>\n</devices>\n</domain>\n",
            dtype = if accel == "kvm" { "kvm" } else { "qemu" },
            kernel = guest.join("vmlinuz").display(),
            initrd = guest.join("initrd.img").display(),
            console = console.display(),
            qga = dir.join("qga.sock").display(),
        );
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml).expect("domain XML");
        run(virsh(uri).arg("create").arg(&file));
        LvGuest {
            uri: uri.into(),
            name: name.into(),
            console,
        }
    }

    fn running(&self) -> bool {
        virsh(&self.uri)
            .args(["domstate", &self.name])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "running")
            .unwrap_or(false)
    }

    /// Each disk's current source, in target order.
    fn sources(&self) -> Vec<PathBuf> {
        let out = run(virsh(&self.uri).args(["domblklist", &self.name]));
        out.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let t = w.next()?;
                let s = w.next()?;
                t.starts_with("vd").then(|| PathBuf::from(s))
            })
            .collect()
    }
}

impl Drop for LvGuest {
    fn drop(&mut self) {
        let _ = virsh(&self.uri)
            .args(["destroy", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Linux's name of the k-th virtio disk (0 -> vda, 26 -> vdaa).
fn target(k: usize) -> String {
    let mut s = String::new();
    let mut i = k as i64;
    loop {
        s.insert(0, (b'a' + (i % 26) as u8) as char);
        i = i / 26 - 1;
        if i < 0 {
            break;
        }
    }
    format!("vd{s}")
}

/// N chains of depth D in `img`: returns the tops and every chain file.
fn make_chains(img: &Path, n: usize, depth: usize) -> (Vec<PathBuf>, BTreeSet<PathBuf>) {
    std::fs::create_dir_all(img).expect("image dir");
    let img = std::fs::canonicalize(img).expect("image dir");
    let mut tops = Vec::new();
    let mut all = BTreeSet::new();
    for k in 0..n {
        let mut prev: Option<PathBuf> = None;
        for j in 0..depth {
            let f = img.join(format!("d{k}.c{j}.qcow2"));
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-f", "qcow2"]);
            if let Some(p) = &prev {
                c.arg("-b").arg(p).args(["-F", "qcow2"]);
            }
            run(c.arg(&f).arg(DISK_SIZE));
            all.insert(f.clone());
            prev = Some(f);
        }
        tops.push(prev.expect("depth >= 1"));
    }
    (tops, all)
}

/// Removes every file of `img` that is not one of the chain files.
fn remove_overlays(img: &Path, keep: &BTreeSet<PathBuf>) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(img).expect("image dir").flatten() {
        let p = e.path();
        if !keep.contains(&p) {
            std::fs::remove_file(&p).unwrap_or_else(|err| panic!("remove {}: {err}", p.display()));
            n += 1;
        }
    }
    n
}

/// libvirt's guest back at depth D (untimed): `virsh blockcommit --active
/// --pivot --shallow` per disk, then every disk on its boot-time image.
fn libvirt_flatten(lv: &LvGuest, tops: &[PathBuf], what: &str) {
    let now = lv.sources();
    assert_eq!(now.len(), tops.len(), "{what}: domblklist: {now:?}");
    for (k, (src, top)) in now.iter().zip(tops).enumerate() {
        assert_ne!(src, top, "{what}: disk {} was not switched", target(k));
    }
    for k in 0..tops.len() {
        run(virsh(&lv.uri).args([
            "blockcommit",
            &lv.name,
            &target(k),
            "--active",
            "--pivot",
            "--shallow",
        ]));
    }
    assert_eq!(lv.sources(), tops, "{what}: sources after the commit-back");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Series {
    Libvirt,
    Vsnap,
    VsnapNoMeta,
}

const ALL: [Series; 3] = [Series::Libvirt, Series::Vsnap, Series::VsnapNoMeta];

#[derive(Default)]
struct Results {
    libvirt: Vec<Duration>,
    vsnap: Vec<Duration>,
    vsnap_nometa: Vec<Duration>,
    ready: (String, String),
    accel: String,
}

#[allow(clippy::too_many_arguments)]
fn bench(
    uri: &str,
    n: usize,
    depth: usize,
    vsnap: &Path,
    dir: &Path,
    warmup: usize,
    iters: usize,
) -> Results {
    let (vdir, ldir) = (dir.join("vsnap"), dir.join("libvirt"));
    let (vimg, limg) = (vdir.join("img"), ldir.join("img"));
    let (vtops, vfiles) = make_chains(&vimg, n, depth);
    let (ltops, lfiles) = make_chains(&limg, n, depth);
    let vimg = std::fs::canonicalize(&vimg).expect("image dir");
    let limg = std::fs::canonicalize(&limg).expect("image dir");

    let g = Guest::boot(&vdir, &vtops);
    let ldir = std::fs::canonicalize(&ldir).expect("libvirt dir");
    let dom = format!("vsnap-bench-{}-{n}x{depth}", std::process::id());
    let lv = LvGuest::create(uri, &dom, &ldir, &ltops, &g.accel);
    let vready = wait_ready(&g.console, || qemu_alive(g.pid));
    let lready = wait_ready(&lv.console, || lv.running());

    let mut q = ok(live::qmp(&g.qmp), "connect");
    let boot_nodes: BTreeSet<String> = node_names(&mut q).into_iter().map(|n| n.0).collect();
    let disks = disks_at_boot(&mut q, &vtops);
    drop(q);
    assert_eq!(lv.sources(), ltops, "libvirt's disks at boot");

    let state = vdir.join("state");
    let mut r = Results {
        ready: (vready, lready),
        accel: g.accel.clone(),
        ..Default::default()
    };
    let mut attached = false;
    for i in 0..warmup + iters {
        let keep = i >= warmup;
        for s in (0..ALL.len()).map(|j| ALL[(i + j) % ALL.len()]) {
            let what = format!("{n} disk(s) depth {depth}: {s:?} #{i}");
            match s {
                Series::Libvirt => {
                    let d = timed(virsh(uri).args([
                        "snapshot-create-as",
                        &dom,
                        &format!("l{i}"),
                        "--disk-only",
                        "--atomic",
                        "--no-metadata",
                    ]));
                    libvirt_flatten(&lv, &ltops, &what);
                    assert_eq!(remove_overlays(&limg, &lfiles), n, "{what}: overlays");
                    if keep {
                        r.libvirt.push(d);
                    }
                }
                Series::Vsnap | Series::VsnapNoMeta => {
                    if attached {
                        run(vsnap_cmd(vsnap, &state).args([
                            "domain",
                            "undefine",
                            "bench",
                            "--snapshots-metadata",
                        ]));
                    }
                    run(vsnap_cmd(vsnap, &state)
                        .args(["domain", "attach", "bench", "--qmp"])
                        .arg(&g.qmp)
                        .arg("--agent")
                        .arg(&g.agent));
                    attached = true;
                    let mut c = vsnap_cmd(vsnap, &state);
                    c.args([
                        "snapshot",
                        "create",
                        "bench",
                        &format!("v{i}"),
                        "--disk-only",
                    ]);
                    if s == Series::VsnapNoMeta {
                        c.args(["--atomic", "--no-metadata"]);
                    }
                    let d = timed(&mut c);
                    commit_back(&g.qmp, &disks, &boot_nodes, &what);
                    assert_eq!(remove_overlays(&vimg, &vfiles), n, "{what}: overlays");
                    if keep {
                        match s {
                            Series::Vsnap => r.vsnap.push(d),
                            _ => r.vsnap_nometa.push(d),
                        }
                    }
                }
            }
        }
    }
    drop(lv);
    drop(g);
    r
}

fn pp(v: &[Duration]) -> String {
    format!("{:.0} / {:.0}", pct(v, 50.0), pct(v, 90.0))
}

fn ratio(a: &[Duration], b: &[Duration]) -> String {
    format!(
        "{:.2}x ({:.2}x)",
        pct(a, 50.0) / pct(b, 50.0),
        pct(a, 90.0) / pct(b, 90.0)
    )
}

fn main() {
    let iters = env_num("VSNAP_BENCH_ITERS", 10).max(1);
    let warmup = env_num("VSNAP_BENCH_WARMUP", 1);
    let counts = env_list("VSNAP_BENCH_DISKS", "1,4,16");
    let depths = env_list("VSNAP_BENCH_DEPTHS", "1,20");
    let uri = std::env::var("VSNAP_BENCH_LIBVIRT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let base = std::env::var_os("VSNAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    run(Command::new(repo_root().join("scripts/libvirt-setup.sh"))
        .env("VSNAP_BENCH_LIBVIRT_URI", &uri));
    let version = virsh(&uri)
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| {
            panic!(
                "`virsh -c {uri} version` failed: libvirtd does not answer \
                 (scripts/libvirt-setup.sh starts it)"
            )
        });
    let vsnap = vsnap_binary();
    run(Command::new(repo_root().join("guest/build.sh")).stdout(Stdio::null()));
    let dir = base.join(format!("vsnap-bench-libvirt.{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    println!("bench vs_libvirt: vsnap = {}", vsnap.display());
    for l in version.lines().filter(|l| !l.trim().is_empty()) {
        println!("bench vs_libvirt: {}", l.trim());
    }
    println!(
        "bench vs_libvirt: work dir {} ; {warmup} warm-up + {iters} measured iterations per series; \
         idle guests (blank disks); load average at start {}",
        dir.display(),
        loadavg()
    );
    let mut all = Vec::new();
    for &n in &counts {
        for &depth in &depths {
            let sub = dir.join(format!("n{n}d{depth}"));
            let t = Instant::now();
            let r = bench(&uri, n, depth, &vsnap, &sub, warmup, iters);
            println!(
                "bench vs_libvirt: {n} disk(s), depth {depth}: {:.0} s ({}); vsnap's guest: {}; libvirt's guest: {}",
                t.elapsed().as_secs_f64(),
                r.accel,
                r.ready.0,
                r.ready.1
            );
            let _ = std::fs::remove_dir_all(&sub);
            all.push((n, depth, r));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!("Whole command, wall clock, ms, p50 / p90 (nearest rank), {iters} measurements each:");
    println!("  libvirt       = virsh -c {uri} snapshot-create-as DOM NAME --disk-only --atomic --no-metadata");
    println!("  vsnap         = vsnap --state-dir S snapshot create DOM NAME --disk-only");
    println!("  vsnap no-meta = the same with --atomic --no-metadata");
    println!("  ratio         = vsnap / libvirt at p50 (p90)");
    println!();
    println!(
        "{:>5}  {:>5}  {:>13}  {:>13}  {:>15}  {:>13}  {:>15}",
        "disks", "depth", "libvirt", "vsnap", "ratio", "vsnap no-meta", "ratio"
    );
    let mut verdicts = Vec::new();
    for (n, depth, r) in &all {
        println!(
            "{:>5}  {:>5}  {:>13}  {:>13}  {:>15}  {:>13}  {:>15}",
            n,
            depth,
            pp(&r.libvirt),
            pp(&r.vsnap),
            ratio(&r.vsnap, &r.libvirt),
            pp(&r.vsnap_nometa),
            ratio(&r.vsnap_nometa, &r.libvirt)
        );
        let r50 = pct(&r.vsnap, 50.0) / pct(&r.libvirt, 50.0);
        verdicts.push(format!(
            "{n} disk(s), depth {depth}: vsnap / libvirt = {r50:.2}x at p50: {}",
            if r50 <= 1.0 {
                "at most libvirt's time"
            } else {
                "SLOWER than libvirt"
            }
        ));
    }
    println!();
    for v in verdicts {
        println!("bench vs_libvirt: {v}");
    }
    println!("bench vs_libvirt: load average at the end {}", loadavg());
}
