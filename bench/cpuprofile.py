#!/usr/bin/env python3
"""Where a peer's CPU goes over one pull of the 200 MiB image: `perf record` of the peer's
processes during the pull, each sample put in one category by its call chain (cryptography,
SHA-256, kernel network, kernel file I/O, user-space copies, scheduling and wake-ups, memory
management, the rest), as CPU-s per GiB beside the `openssl speed` floor. It answers "what bounds
this figure" for the CPU goals of bench/RESULTS.md.

  python3 bench/cpuprofile.py --peer regproxy --case warm        # needs perf (Debian linux-perf) and root
  python3 bench/cpuprofile.py --peer nginx --case cold --out /tmp/nginx-cold.md
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402

# (category, substrings of a frame's symbol); the first frame of a chain (leaf first) that matches
# any category decides, in this order of categories for one frame.
CATEGORIES = [
    ("SHA-256", ("sha256", "sha2::", "sha256_block")),
    ("AES-GCM (TLS records)", ("aes_gcm", "gcm_ghash", "aesni", "_aes_", "ChaCha", "chacha", "poly1305", "gcm_",
                               "libcrypto.so")),
    ("TLS handshakes, certificates", ("ecp_nistz256", "p256", "rcgen", "x25519", "rsa", "bn_mul", "EcdsaKeyPair", "webpki")),
    ("scheduling, wake-ups, futex", ("finish_task_switch", "__schedule", "futex", "try_to_wake_up", "schedule_hrtimeout",
                                     "epoll_wait", "ep_poll", "eventfd", "exit_to_user_mode", "irqentry_exit", "Condvar",
                                     "park", "__wake_up", "pthread_cond")),
    ("memory management (faults, zeroing, malloc)", ("clear_page", "page_fault", "folio_zero", "do_anonymous_page",
                                                     "unmap_page", "memcg", "mmap", "munmap", "madvise", "malloc", "free",
                                                     "realloc", "mi_", "memset", "zap_", "tlb_")),
    ("kernel: network (TCP send/receive)", ("tcp_", "skb", "sock_", "__sys_sendto", "__sys_recvfrom", "inet_", "ip_",
                                            "net_rx", "netif", "loopback", "__dev_queue", "sk_", "__napi", "do_writev",
                                            "sock_write_iter", "sock_recvmsg")),
    ("kernel: files (page cache read/write, fsync)", ("ext4_", "filemap", "generic_perform_write", "vfs_read", "vfs_write",
                                                      "pread64", "preadv", "copy_page_to_iter", "folio", "jbd2", "fsync",
                                                      "iomap", "mpage", "blk_", "bio_")),
    ("user-space copies (memcpy)", ("memmove", "memcpy", "copy_to_vec", "extend_from_slice")),
    ("HTTP (hyper, h2, httparse)", ("hyper::", "h2::", "httparse", "http::")),
]


def category(frames):
    for sym in frames:
        for name, keys in CATEGORIES:
            if any(k in sym for k in keys):
                return name
    return "other"


def samples(data):
    """Call chains (leaf first) of the samples in perf.data."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True, text=True,
                         errors="replace").stdout
    chains, cur = [], []
    for line in out.splitlines():
        line = line.strip()
        if not line:
            if cur:
                chains.append(cur)
            cur = []
            continue
        # "IP SYMBOL (DSO)": the symbol, or for code without symbols (OpenSSL's assembly) the DSO.
        sym, _, dso = line.partition(" ")[2].rpartition(" (")
        cur.append(f"[unknown] {dso.rstrip(')')}" if sym in ("", "[unknown]") else sym)
    if cur:
        chains.append(cur)
    return chains


def profile(a, work):
    big = B.image_layout(a.image_cache, "big", 1, "200MiB", 1)
    size = B.image_bytes(big[0])
    origin = B.Origin(work)
    origin.start()
    clients = B.Clients(work)
    B.push(origin, clients, big[0], "big")
    make = {"regproxy": lambda: B.Regproxy(work, origin, a.regproxy), "nginx": lambda: B.Nginx(work, origin),
            "distribution": lambda: B.Mirror(work, origin),
            "mitmproxy": lambda: B.Mitm(work, origin, a.mitmdump)}
    peer = make[a.peer]()
    peer.start()
    try:
        if a.case == "warm":
            B.measured(clients, origin, peer, ["big"])
            if peer.caching:
                origin.stop()
        pids = sorted({q for p in peer.tls_pids() if p for q in B.tree_pids(p)})
        data = a.data or os.path.join(work, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-F", str(a.freq), "--call-graph", "dwarf,16384", "-o", data,
                                 "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        wall, cpu = B.measured(clients, origin, peer, ["big"])
        perf.send_signal(signal.SIGINT)
        perf.wait()
        suites = B.negotiated([peer.log]) if a.peer == "regproxy" else {}
        floor = B.cpu_floor(suites)
    finally:
        peer.stop_all()
        origin.stop()
    chains = samples(data)
    counts = {}
    for c in chains:
        k = category(c)
        counts[k] = counts.get(k, 0) + 1
    return wall, cpu["tls"], size, counts, len(chains), floor


def report(a):
    """Markdown lines: the categorised profile of one pull by `a.peer` in `a.case`."""
    work = tempfile.mkdtemp(prefix="regproxy-profile-")
    try:
        wall, cpu, size, counts, n, floor = profile(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_gib = cpu / (size / B.GiB)
    L = [f"{a.peer}, {a.case} pull of 1 × 200 MiB: {per_gib:.2f} CPU-s/GiB with perf running ({cpu:.2f} s of "
         f"CPU, wall {wall:.2f} s, {n} samples); floor {floor[a.case]:.2f} CPU-s/GiB "
         f"({'decrypt + encrypt + SHA-256' if a.case == 'cold' else 'encrypt'}).", "",
         "| where | share | CPU-s/GiB |", "|---|---:|---:|"]
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {100 * v / n:.1f} % | {per_gib * v / n:.2f} |")
    sha = counts.get("SHA-256", 0)
    if sha:
        # What the "least CPU" goal compares: a cache that checks no digest (nginx's) skips this row.
        L += ["", f"Less its SHA-256 row (every byte checked against its digest before it is cached or its last "
                  f"byte served): {per_gib * (1 - sha / n):.2f} CPU-s/GiB."]
    return L + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regproxy", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(B.ROOT, "target")),
                                                       "release", "regproxy"))
    ap.add_argument("--mitmdump", default=shutil.which("mitmdump") or os.path.join(HERE, ".venv", "bin", "mitmdump"))
    ap.add_argument("--peer", default="regproxy", choices=["regproxy", "nginx", "distribution", "mitmproxy"])
    ap.add_argument("--case", default="cold", choices=["cold", "warm"])
    ap.add_argument("--freq", type=int, default=1999)
    ap.add_argument("--image-cache", default="/tmp/regproxy-bench-images")
    ap.add_argument("--data", default=None, help="keep perf.data here (for perf report)")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    a = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("profile.py: perf not found (Debian: apt-get install linux-perf)")
    for k in list(os.environ):
        if "proxy" in k.lower():
            del os.environ[k]
    text = "\n".join(report(a))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
