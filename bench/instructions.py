#!/usr/bin/env python3
"""User-space instructions per small request, counted by callgrind: a figure that does not move
with the machine's load, for A/B of builds where CPU time per request (bench/small.py) moves by
±20% between runs on these shared 2-core machines.

Each binary runs under `valgrind --tool=callgrind`; after a warm-up the counters are zeroed
(`callgrind_control -z`), `examples/loadgen` sends N cached manifest requests, and the dump that
follows is read. Kernel work (the socket system calls) is not counted: this says what regproxy's
own code costs, not what a request costs in all.

  python3 bench/instructions.py target/release/regproxy /tmp/other-build/regproxy
  python3 bench/instructions.py --method GET --by tag --requests 4000 BIN... --annotate /tmp/cg
  (needs valgrind, from Debian's package; --annotate keeps each dump for callgrind_annotate)
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402
import small as S  # noqa: E402


def dumped_instructions(prefix):
    """The instructions of the dumps callgrind wrote on request (`PREFIX.PID.N`)."""
    total = 0
    for path in glob.glob(prefix + ".*.*"):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total


def count(binary, origin, digest, a, loadgen):
    """Instructions per request of `binary` answering a.requests cached requests."""
    work = tempfile.mkdtemp(prefix="regproxy-instructions-")
    try:
        prefix = os.path.join(work, "callgrind.out")
        wrap = os.path.join(work, "regproxy")
        with open(wrap, "w") as f:
            f.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={prefix}.%p {binary} \"$@\"\n")
        os.chmod(wrap, 0o755)
        p = B.Regproxy(work, origin, wrap)
        p.start()
        try:
            path = S.paths(digest)[a.by]
            S.warm(loadgen, p, digest)
            S.loadgen(loadgen, p, a.method, path, a.conns, 120, max_requests=200)
            subprocess.run(["callgrind_control", "-z", str(p.proc.pid)], check=True, capture_output=True)
            out = S.loadgen(loadgen, p, a.method, path, a.conns, 600, max_requests=a.requests)
            subprocess.run(["callgrind_control", "-d", str(p.proc.pid)], check=True, capture_output=True)
        finally:
            p.stop()
        if a.annotate:
            for i, path in enumerate(sorted(glob.glob(prefix + ".*.*"))):
                shutil.copy(path, f"{a.annotate}-{os.path.basename(binary)}-{i}.out")
        return dumped_instructions(prefix) / out["count"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binaries", nargs="+", help="regproxy binaries to compare")
    ap.add_argument("--method", default="HEAD", choices=["HEAD", "GET"])
    ap.add_argument("--by", default="tag", choices=["tag", "digest"])
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--image-cache", default="/tmp/regproxy-bench-images")
    ap.add_argument("--annotate", default=None, help="keep the dumps as PREFIX-BINARY-N.out")
    a = ap.parse_args()
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        del os.environ[k]
    if not shutil.which("callgrind_control"):
        sys.exit("bench/instructions.py: needs valgrind (Debian: apt-get install valgrind)")
    loadgen = S.loadgen_bin(os.path.abspath(a.binaries[0]))
    if not os.access(loadgen, os.X_OK):
        sys.exit(f"bench/instructions.py: no {loadgen} (cargo build --release --example loadgen)")
    work = tempfile.mkdtemp(prefix="regproxy-instructions-origin-")
    big = B.image_layout(a.image_cache, S.IMAGE, 1, "200MiB", 1)
    origin = B.Origin(work)
    origin.start()
    try:
        B.push(origin, B.Clients(work), big[0], S.IMAGE)
        digest = S.manifest_digest(big[0])
        for binary in a.binaries:
            per = count(os.path.abspath(binary), origin, digest, a, loadgen)
            print(f"{binary}: {a.method} manifest by {a.by}, {a.conns} connections, {a.requests} requests: "
                  f"{per:,.0f} instructions per request", flush=True)
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
