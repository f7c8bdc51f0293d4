#!/usr/bin/env python3
"""Assemble the vsnap test guest's initramfs (cpio newc, uncompressed or gzip),
reproducibly.

Called by guest/build.sh; knows nothing about apt. Inputs are directories
where Debian packages were extracted with `dpkg -x` ("roots"). Output bytes
depend only on the inputs: entries sorted, owner root, fixed mtime, gzip
(if asked) without a name or time stamp.

  mkinitramfs.py --out initrd.img --root DIR [--root DIR ...]
      --modules-dir ROOT/lib/modules/VERSION --module NAME [--module NAME ...]
      --busybox PATH --elf SRC:DEST [--elf SRC:DEST ...] --file SRC:DEST [...]
      [--manifest FILE] [--compress none|gzip]

--elf copies an ELF program and, when it is dynamic, its interpreter and every
shared library it needs (DT_NEEDED, walked transitively), taken from the roots
only: never from the host. --file copies a file as it is (mode kept).
"""

import argparse
import gzip
import os
import struct
import subprocess
import sys

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
GUEST_LIBDIR = "lib/x86_64-linux-gnu"


def die(msg):
    sys.exit(f"mkinitramfs: {msg}")


# ---------------------------------------------------------------- ELF


def elf_info(path):
    """(interp or None, [DT_NEEDED sonames]) of an ELF64 little-endian file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        die(f"{path}: not an ELF64 little-endian file")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum) = struct.unpack_from("<HHHH", data, 0x36)
    interp = None
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    sections = []
    for i in range(e_shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        sections.append(sh)  # name, type, flags, addr, offset, size, link, info, align, entsize
    needed = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                start = strtab[4] + val
                needed.append(data[start : data.index(b"\0", start)].decode())
    return interp, needed


def resolve_in_root(root, rel):
    """Path of ROOT/REL with symlinks followed inside ROOT (absolute links
    are taken relative to ROOT, never to the host)."""
    parts = [p for p in rel.split("/") if p]
    cur = root
    hops = 0
    while parts:
        p = parts.pop(0)
        nxt = os.path.join(cur, p)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = [x for x in target.split("/") if x] + parts
            continue
        if p == "..":
            cur = os.path.dirname(cur) if cur != root else root
            continue
        cur = nxt
    return cur if os.path.exists(cur) else None


def find_lib(roots, soname):
    for root in roots:
        for d in LIBDIRS:
            p = resolve_in_root(root, f"{d}/{soname}")
            if p and os.path.isfile(p):
                return p
    return None


# ---------------------------------------------------------------- modules


def modinfo_depends(path):
    with open(path, "rb") as f:
        data = f.read()
    for field in data.split(b"\0"):
        if field.startswith(b"depends="):
            return [d for d in field[8:].decode().split(",") if d]
    return []


def module_order(moddir, wanted):
    """.ko paths of WANTED plus their dependencies, dependencies first;
    modules built into the kernel are left out."""
    norm = lambda n: n.replace("-", "_")
    builtin = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        for line in open(bpath):
            builtin.add(norm(os.path.basename(line.strip())[: -len(".ko")]))
    index = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if f.endswith(".ko"):
                index[norm(f[:-3])] = os.path.join(dirpath, f)
    order, seen = [], set()

    def visit(name, chain):
        name = norm(name)
        if name in seen:
            return
        if name in chain:
            die(f"module dependency cycle: {' -> '.join(chain + [name])}")
        if name not in index:
            if name in builtin:
                seen.add(name)
                return
            die(f"module {name} is neither in {moddir}/kernel nor built in")
        for dep in modinfo_depends(index[name]):
            visit(dep, chain + [name])
        seen.add(name)
        order.append((name, index[name]))

    for w in wanted:
        visit(w, [])
    return order, sorted(norm(w) for w in wanted if norm(w) in builtin and norm(w) not in index)


# ---------------------------------------------------------------- cpio


class Archive:
    def __init__(self):
        self.entries = {}  # path -> (mode, data)

    def add_dir(self, path):
        path = path.strip("/")
        while path and path not in self.entries:
            self.entries[path] = (0o040755, b"")
            path = os.path.dirname(path)

    def add_file(self, path, data, mode):
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = (0o100000 | mode, data)

    def add_symlink(self, path, target):
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = (0o120777, target.encode())

    def add_chardev(self, path, major, minor, mode=0o600):
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = (0o020000 | mode, (major, minor))

    def cpio(self):
        out = bytearray()

        def pad():
            out.extend(b"\0" * (-len(out) % 4))

        def header(ino, mode, size, name, rdev=(0, 0), nlink=1):
            fields = (ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
            out.extend(b"070701" + b"".join(b"%08X" % v for v in fields))
            out.extend(name.encode() + b"\0")
            pad()

        for ino, path in enumerate(sorted(self.entries), start=1):
            mode, data = self.entries[path]
            if mode & 0o170000 == 0o020000:
                header(ino, mode, 0, path, rdev=data)
                continue
            header(ino, mode, len(data), path, nlink=2 if mode & 0o170000 == 0o040000 else 1)
            out.extend(data)
            pad()
        header(0, 0, 0, "TRAILER!!!", nlink=1)
        out.extend(b"\0" * (-len(out) % 512))
        return bytes(out)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", action="append", default=[])
    ap.add_argument("--modules-dir", required=True)
    ap.add_argument("--module", action="append", default=[])
    ap.add_argument("--busybox", required=True)
    ap.add_argument("--elf", action="append", default=[])
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--manifest")
    ap.add_argument("--compress", choices=("none", "gzip"), default="none")
    a = ap.parse_args()

    arc = Archive()
    notes = []
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "var", "etc", "root"):
        arc.add_dir(d)
    arc.add_chardev("dev/console", 5, 1)
    arc.add_chardev("dev/null", 1, 3, 0o666)

    # busybox and its applet links
    arc.add_file("bin/busybox", read(a.busybox), 0o755)
    applets = subprocess.run([a.busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    for ap_path in applets:
        if ap_path != "bin/busybox":
            arc.add_symlink(ap_path, "/bin/busybox")
    notes.append(f"busybox applets: {len(applets)}")

    # ELF programs and their libraries
    libs = {}
    for spec in a.elf:
        src, dest = spec.split(":", 1)
        arc.add_file(dest, read(src), 0o755)
        interp, needed = elf_info(src)
        if interp:
            p = find_lib(a.root, os.path.basename(interp))
            if not p:
                die(f"{src}: interpreter {interp} not found in the extracted packages")
            libs[os.path.basename(interp)] = p
            arc.add_symlink(interp, f"/{GUEST_LIBDIR}/{os.path.basename(interp)}")
        todo = list(needed)
        while todo:
            so = todo.pop(0)
            if so in libs:
                continue
            p = find_lib(a.root, so)
            if not p:
                die(f"{src}: needs {so}, which no extracted package provides")
            libs[so] = p
            todo.extend(elf_info(p)[1])
        notes.append(f"{dest}: {'dynamic' if interp else 'static'}, needs {', '.join(needed) or 'nothing'}")
    for so in sorted(libs):
        arc.add_file(f"{GUEST_LIBDIR}/{so}", read(libs[so]), 0o755)
        where = next((os.path.relpath(libs[so], os.path.dirname(r)) for r in a.root if libs[so].startswith(r + "/")), libs[so])
        notes.append(f"lib {so} <- {where}")

    for spec in a.file:
        src, dest = spec.split(":", 1)
        # 0755 or 0644 whatever the checkout's umask was (reproducible).
        arc.add_file(dest, read(src), 0o755 if os.stat(src).st_mode & 0o111 else 0o644)

    # kernel modules, flat, with their load order
    order, builtin = module_order(a.modules_dir, a.module)
    for name, path in order:
        arc.add_file(f"lib/modules/{name}.ko", read(path), 0o644)
        notes.append(f"module {name} <- {os.path.relpath(path, a.modules_dir)}")
    for name in builtin:
        notes.append(f"module {name}: built into the kernel")
    arc.add_file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in order).encode(), 0o644)

    raw = arc.cpio()
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        if a.compress == "gzip":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
                gz.write(raw)
        else:
            f.write(raw)
    os.replace(tmp, a.out)
    notes.append(f"initramfs: {len(raw)} bytes of cpio newc, compression {a.compress}: {os.path.getsize(a.out)} bytes")
    if a.manifest:
        with open(a.manifest, "w") as f:
            f.write("".join(n + "\n" for n in notes))
    else:
        print("\n".join(notes))


if __name__ == "__main__":
    main()
