"""Small requests (issue 16, item 4): manifest HEAD hits by digest and tag hits, regproxy against nginx
serving the same answers from its cache; latency (p50, p99) and requests per second on 1 and 64
connections. bench.py calls `register`, `phase` and `goals`.

The load comes from `examples/loadgen.rs` (Rust, tokio + hyper + rustls), not Python, so that the
client is not what bounds either server. regproxy is reached as users reach it: `CONNECT
registry.test:PORT`, then TLS inside. nginx's TLS port is reached directly: its CONNECT front in the
main bench is a Python relay (bench/tunnel.py) that would bound nginx, not measure it, and a CONNECT
costs a connection's setup only, which is outside the measured interval here anyway.
"""
import json
import os
import subprocess
import time

HOST = "registry.test"
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
CONNS = (1, 64)
# The open-loop cases: this many connections offered this share of the slower peer's closed-loop rate.
OPEN_CONNS, OPEN_SHARE = 64, 0.5
# (method, by): manifest requests answered from the cache
KINDS = (("HEAD", "digest"), ("HEAD", "tag"), ("GET", "tag"))
IMAGE = "big"  # its manifest: 424 bytes, one layer
PEERS = ("regproxy", "nginx")


def case(method, by, conns, what, open_loop=False):
    """The Results case name of one measurement: what is `rps`, `p50` or `p99`; open_loop at OPEN_SHARE."""
    label = {"rps": "requests/s", "p50": "latency p50", "p99": "latency p99", "cpu": "server CPU per request"}[what]
    at = " at half load" if open_loop else ""
    return f"Small: {method} manifest by {by}, {conns} connection{'s' if conns > 1 else ''}{at}, {label}"


def cases():
    """(name, method, by, conns, what, open_loop) of every small case, in table order."""
    out = []
    for m, b in KINDS:
        for c in CONNS:
            out += [(case(m, b, c, w), m, b, c, w, False) for w in ("rps", "p50", "p99", "cpu")]
            if c == OPEN_CONNS:
                out += [(case(m, b, c, w, True), m, b, c, w, True) for w in ("p50", "p99")]
    return out


def register(res, seconds):
    """The small cases' rows in the Results tables, in order."""
    for name, method, by, conns, what, open_loop in cases():
        note = ""
        if open_loop and what == "p50":
            note = (f"Open loop (`examples/loadgen --rate`): {conns} connections offered {OPEN_SHARE:g} × the "
                    f"requests/s of the slower peer in the closed-loop case just before, the same rate for both "
                    f"peers, on a fixed schedule. A request held back because its connection's last answer came "
                    f"late counts from when it was due (as wrk2 does). Closed-loop latency at saturation measures "
                    f"queueing: each connection waits for every other one served before it, so a server that "
                    f"serves some connections ahead of others gets a lower p50 and a higher p99; these rows "
                    f"compare the two at one load they both carry. Lower is better.")
        if what == "rps":
            note = (f"`examples/loadgen` for {seconds:g} s after every connection is set up, one request in flight "
                    f"per connection, keep-alive HTTP/1.1 over TLS; only 200 answers count (any other status "
                    f"fails the run). Higher is better.")
        if what == "cpu":
            note = ("User + system CPU time of the processes that answer (regproxy; nginx's workers) over the run, "
                    "÷ requests answered: what the server itself spends, which the load generator sharing the two "
                    "CPUs does not blur as it does requests/s. Lower is better.")
        res.case(name, {"rps": "rps", "cpu": "µs"}.get(what, "ms"), note)


def loadgen_bin(regproxy_bin):
    """The example built beside the regproxy binary (`cargo build --release --example loadgen`)."""
    return os.path.join(os.path.dirname(regproxy_bin), "examples", "loadgen")


def manifest_digest(layout):
    with open(os.path.join(layout, "index.json")) as f:
        return json.load(f)["manifests"][0]["digest"]


def target_args(peer):
    """How loadgen reaches the peer: regproxy through CONNECT, nginx's TLS server directly."""
    authority = f"{HOST}:{peer.o.port}"
    if peer.name == "regproxy":
        return ["--addr", f"127.0.0.1:{peer.port}", "--connect", authority, "--host", authority, "--ca", peer.ca]
    return ["--addr", f"127.0.0.1:{peer.tls_port}", "--host", authority, "--ca", peer.ca]


def loadgen(binary, peer, method, path, conns, seconds, max_requests=None, rate=None):
    """One loadgen run: its JSON; raises unless every answer was a 200 and some came."""
    cmd = [binary, *target_args(peer), "--method", method, "--path", path, "--header", f"Accept: {ACCEPT}",
           "--conns", str(conns), "--seconds", str(seconds)]
    if max_requests:
        cmd += ["--max-requests", str(max_requests)]
    if rate:
        cmd += ["--rate", f"{rate:.0f}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen {method} {path} via {peer.name}: exit {r.returncode}: {r.stderr[-400:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["errors"] or out["failed_conns"] or not out["count"]:
        raise RuntimeError(f"loadgen {method} {path} via {peer.name}: {out['count']} answered, {out['errors']} "
                           f"errors, {out['failed_conns']} connections failed, statuses {out['statuses']}: "
                           f"{r.stderr[-300:]}")
    return out


def paths(digest):
    return {"digest": f"/v2/test/{IMAGE}/manifests/{digest}", "tag": f"/v2/test/{IMAGE}/manifests/latest"}


def warm(binary, peer, digest):
    """Fills the peer's cache with the manifest by digest and by tag (GET, then HEAD), as a pull would."""
    p = paths(digest)
    for method, by in (("GET", "digest"), ("GET", "tag"), ("HEAD", "tag"), ("HEAD", "digest")):
        loadgen(binary, peer, method, p[by], 1, 5, max_requests=5)


def cache_statuses(nginx):
    """{status: count} of nginx's manifest answers: HIT, and EXPIRED/UPDATING/MISS when it asked the origin."""
    return nginx.cache_statuses("/manifests/")


def phase(regproxy_bin, peers, layout, res, rounds, seconds, log, cpu_s):
    """Every small case for regproxy and nginx, peers interleaved within a round. Returns failures."""
    binary = loadgen_bin(regproxy_bin)
    if not os.path.exists(binary):
        return [f"small: {binary} missing (cargo build --release --example loadgen)"]
    chosen = [p for p in peers if p.name in PEERS]
    digest = manifest_digest(layout)
    failures = []
    for p in chosen:
        p.fresh()
        try:
            warm(binary, p, digest)
        except Exception as e:  # noqa: BLE001
            failures.append(f"small, {p.name}, warm-up: {e}")
            log(failures[-1])
    ready = [p for p in chosen if not any(f.startswith(f"small, {p.name},") for f in failures)]
    for r in range(rounds):
        log(f"small requests: round {r + 1}/{rounds}")
        for method, by in KINDS:
            for conns in CONNS:
                rps = {}
                for p in ready:
                    try:
                        rps[p.name] = measure(binary, p, method, by, conns, seconds, digest, res, cpu_s)
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"small, round {r + 1}, {p.name}: {e}")
                        log(failures[-1])
                if conns != OPEN_CONNS or len(rps) < 2:
                    continue
                rate = OPEN_SHARE * min(rps.values())
                res.notes.append(f"small requests, round {r + 1}: {method} by {by} at half load offered "
                                 f"{rate:.0f} requests/s")
                for p in ready:
                    try:
                        measure(binary, p, method, by, conns, seconds, digest, res, cpu_s, rate)
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"small, round {r + 1}, {p.name}, half load: {e}")
                        log(failures[-1])
    for p in chosen:
        if p.name == "nginx":
            res.notes.append(f"small requests: nginx's manifest answers by cache status {cache_statuses(p)} (its "
                             f"tags are fresh for 1 s, then one request revalidates while others get the stale copy)")
        if p.name == "regproxy":
            hits = [l for l in p.metrics().splitlines() if l.startswith(("regproxy_requests_total", "regproxy_upstream_requests_total"))]
            res.notes.append("small requests: regproxy's manifest counters " + "; ".join(hits)[:600])
    return failures


def measure(binary, peer, method, by, conns, seconds, digest, res, cpu_s, rate=None):
    """One loadgen run recorded in `res` (closed loop, or open at `rate`); its requests/s."""
    before = cpu_s(peer.tls_pids())
    out = loadgen(binary, peer, method, paths(digest)[by], conns, seconds, rate=rate)
    spent = cpu_s(peer.tls_pids()) - before
    if rate and out["rps"] < 0.9 * rate:
        raise RuntimeError(f"offered {rate:.0f} requests/s, answered {out['rps']:.0f}/s")
    res.add(case(method, by, conns, "p50", bool(rate)), peer.name, out["p50_us"] / 1000)
    res.add(case(method, by, conns, "p99", bool(rate)), peer.name, out["p99_us"] / 1000)
    if not rate:
        res.add(case(method, by, conns, "rps"), peer.name, out["rps"])
        res.add(case(method, by, conns, "cpu"), peer.name, 1e6 * spent / out["count"])
    time.sleep(0.2)
    return out["rps"]


def goals(res, goal):
    """At or above nginx: requests per second not lower, latencies not higher, in every small case."""
    for name, method, by, conns, what, _open in cases():
        if what == "cpu":
            continue  # reported beside the goals: it explains them, the issue sets none for it
        mine, theirs = res.med(name, "regproxy"), res.med(name, "nginx")
        ratio = mine / theirs if mine is not None and theirs else None
        ok = ratio is not None and (ratio >= 1 if what == "rps" else ratio <= 1)
        sign = "≥" if what == "rps" else "≤"
        goal(f"{name[len('Small: '):]}: regproxy ÷ nginx {sign} 1", ratio, ok,
             "n/a" if ratio is None else f"{ratio:.2f} ({mine:.3g} against {theirs:.3g})")
