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
# (method, by): manifest requests answered from the cache
KINDS = (("HEAD", "digest"), ("HEAD", "tag"), ("GET", "tag"))
IMAGE = "big"  # its manifest: 424 bytes, one layer
PEERS = ("regproxy", "nginx")


def case(method, by, conns, what):
    """The Results case name of one measurement: what is `rps`, `p50` or `p99`."""
    label = {"rps": "requests/s", "p50": "latency p50", "p99": "latency p99", "cpu": "server CPU per request"}[what]
    return f"Small: {method} manifest by {by}, {conns} connection{'s' if conns > 1 else ''}, {label}"


def cases():
    return [(case(m, b, c, w), m, b, c, w) for m, b in KINDS for c in CONNS for w in ("rps", "p50", "p99", "cpu")]


def register(res, seconds):
    """The small cases' rows in the Results tables, in order."""
    for name, method, by, conns, what in cases():
        note = ""
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


def loadgen(binary, peer, method, path, conns, seconds, max_requests=None):
    """One loadgen run: its JSON; raises unless every answer was a 200 and some came."""
    cmd = [binary, *target_args(peer), "--method", method, "--path", path, "--header", f"Accept: {ACCEPT}",
           "--conns", str(conns), "--seconds", str(seconds)]
    if max_requests:
        cmd += ["--max-requests", str(max_requests)]
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
                for p in ready:
                    try:
                        before = cpu_s(p.tls_pids())
                        out = loadgen(binary, p, method, paths(digest)[by], conns, seconds)
                        spent = cpu_s(p.tls_pids()) - before
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"small, round {r + 1}, {p.name}: {e}")
                        log(failures[-1])
                        continue
                    res.add(case(method, by, conns, "rps"), p.name, out["rps"])
                    res.add(case(method, by, conns, "p50"), p.name, out["p50_us"] / 1000)
                    res.add(case(method, by, conns, "p99"), p.name, out["p99_us"] / 1000)
                    res.add(case(method, by, conns, "cpu"), p.name, 1e6 * spent / out["count"])
                    time.sleep(0.2)
    for p in chosen:
        if p.name == "nginx":
            res.notes.append(f"small requests: nginx's manifest answers by cache status {cache_statuses(p)} (its "
                             f"tags are fresh for 1 s, then one request revalidates while others get the stale copy)")
        if p.name == "regproxy":
            hits = [l for l in p.metrics().splitlines() if l.startswith(("regproxy_requests_total", "regproxy_upstream_requests_total"))]
            res.notes.append("small requests: regproxy's manifest counters " + "; ".join(hits)[:600])
    return failures


def goals(res, goal):
    """At or above nginx: requests per second not lower, latencies not higher, in every small case."""
    for name, method, by, conns, what in cases():
        if what == "cpu":
            continue  # reported beside the goals: it explains them, the issue sets none for it
        mine, theirs = res.med(name, "regproxy"), res.med(name, "nginx")
        ratio = mine / theirs if mine is not None and theirs else None
        ok = ratio is not None and (ratio >= 1 if what == "rps" else ratio <= 1)
        sign = "≥" if what == "rps" else "≤"
        goal(f"{name[len('Small: '):]}: regproxy ÷ nginx {sign} 1", ratio, ok,
             "n/a" if ratio is None else f"{ratio:.2f} ({mine:.3g} against {theirs:.3g})")
