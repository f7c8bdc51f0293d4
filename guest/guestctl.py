#!/usr/bin/env python3
"""Small host-side helpers for the vsnap test guest (python3 stdlib only).

  guestctl.py wait-ready LOG [TIMEOUT_S]      wait for VSNAP-GUEST-READY in the
                                              console log; prints the seconds waited
  guestctl.py qmp SOCK JSON [JSON ...]        qmp_capabilities, then each command;
                                              prints each reply (events skipped)
  guestctl.py qga SOCK JSON [JSON ...]        guest-sync-delimited, then each command;
                                              prints each reply
  guestctl.py seq FILE                        parse a writer seq file (raw bytes, e.g.
                                              `debugfs -R 'cat /seq' IMG`); '-' = stdin;
                                              prints JSON {"seq": max, "boot": ..., ...}
  guestctl.py image-seq IMAGE [FORMAT]        the same, read from a disk image (raw or
                                              qcow2; qcow2 is read through `qemu-img convert`
                                              into a temporary raw copy) with debugfs

A JSON argument may also be a bare command name: `guest-ping`.
These are test helpers, not vsnap's clients (those live in steps/).
"""

import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

REC = 512
SLOTS = 64
# Agent commands that never answer on success.
NO_REPLY = {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
RECORD = re.compile(rb"^VSNAPSEQ seq=(\d+) disk=(\S+) boot=(\d+) t_ns=(\d+)\n")


def cmd(arg):
    arg = arg.strip()
    return arg if arg.startswith("{") else json.dumps({"execute": arg})


class Lines:
    def __init__(self, sock, timeout):
        self.sock, self.buf = sock, b""
        sock.settimeout(timeout)

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def qmp(sock_path, commands, timeout=10):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    lines = Lines(s, timeout)

    def reply():
        while True:
            msg = json.loads(lines.read())
            if "event" not in msg:
                return msg

    greeting = json.loads(lines.read())
    assert "QMP" in greeting, greeting
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    reply()
    out = []
    for c in commands:
        s.sendall(cmd(c).encode() + b"\n")
        try:
            out.append(reply())
        except EOFError:  # quit: QEMU may close before replying
            out.append({"closed": True})
            break
    s.close()
    return out


def qga(sock_path, commands, timeout=10):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    lines = Lines(s, timeout)
    token = random.randint(1, 2**31)
    # 0xFF resets the agent's parser; its reply to guest-sync-delimited is
    # preceded by 0xFF, and anything before it is stale output to discard.
    s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode() + b"\n")
    while True:
        line = lines.read()
        if b"\xff" in line:
            line = line[line.rindex(b"\xff") + 1 :]
        try:
            if json.loads(line).get("return") == token:
                break
        except ValueError:
            pass
    out = []
    for c in commands:
        c = cmd(c)
        s.sendall(c.encode() + b"\n")
        if json.loads(c)["execute"] in NO_REPLY:
            out.append({"sent": json.loads(c)["execute"]})
            continue
        out.append(json.loads(lines.read()))
    s.close()
    return out


def parse_seq(data):
    """Records of a writer file: the highest seq and a summary."""
    recs = []
    for slot in range(min(len(data) // REC, SLOTS)):
        m = RECORD.match(data[slot * REC : (slot + 1) * REC])
        if m:
            recs.append((int(m[1]), m[2].decode(), int(m[3]), int(m[4]), slot))
    if not recs:
        return {"seq": 0, "records": 0}
    top = max(recs)
    return {"seq": top[0], "disk": top[1], "boot": top[2], "t_ns": top[3], "slot": top[4], "records": len(recs)}


def image_seq(image, fmt=None):
    if fmt is None:
        with open(image, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    with tempfile.TemporaryDirectory() as tmp:
        raw = image
        if fmt != "raw":
            raw = os.path.join(tmp, "disk.raw")
            subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw], check=True)
        data = subprocess.run(
            ["debugfs", "-R", "cat /seq", raw], check=True, capture_output=True
        ).stdout
    return parse_seq(data)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    what, rest = argv[1], argv[2:]
    if what == "wait-ready":
        log, timeout = rest[0], float(rest[1]) if len(rest) > 1 else 60
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with open(log, "rb") as f:
                    text = f.read()
                if b"VSNAP-GUEST-READY" in text:
                    print(f"{time.monotonic() - t0:.2f}")
                    return 0
                if b"Kernel panic" in text:
                    sys.exit(f"guest panicked: see {log}")
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        sys.exit(f"no VSNAP-GUEST-READY in {log} after {timeout} s")
    if what in ("qmp", "qga"):
        for r in (qmp if what == "qmp" else qga)(rest[0], rest[1:]):
            print(json.dumps(r))
        return 0
    if what == "seq":
        data = sys.stdin.buffer.read() if rest[0] == "-" else open(rest[0], "rb").read()
        print(json.dumps(parse_seq(data)))
        return 0
    if what == "image-seq":
        print(json.dumps(image_seq(rest[0], rest[1] if len(rest) > 1 else None)))
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
