#!/usr/bin/env python3
"""The fleet case: how many times an image crosses the origin link when N regproxy nodes pull it.

    python3 bench/fleet.py --regproxy target/release/regproxy [--nodes 3] [--pulls 8] [--out FILE]

Origin: Debian's docker-registry over TLS on 127.0.0.1 (bench/registry.sh), holding one image of
--layers layers of --size each. Store: Garage on loopback (scripts/garage.sh). Two fleets of
--nodes nodes each take --pulls concurrent cold pulls, spread over the nodes:
  * alone:  each node with its own disk only (what a per-node cache gives today);
  * shared: the nodes share the bucket and know each other (--peer, fleet-wide single flight).
The figure is upstream bytes ÷ image bytes, from the origin's access log (the size of every 2xx GET
of a blob or manifest). The goal for the shared fleet is 1.0. Writes a Markdown table to --out
(default bench/FLEET.md). Every process started is killed and the temp dir removed at the end.
"""
import argparse, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start_registry(work):
    port = free_port()
    d = os.path.join(work, "registry")
    subprocess.run(["bash", os.path.join(HERE, "registry.sh"), d, str(port)], check=True)
    return d, port


def start_garage(work):
    d = os.path.join(work, "garage")
    for _ in range(20):
        port = free_port()
        if port < 65000 and all(_free(p) for p in (port, port + 1)):
            break
    subprocess.run(["bash", os.path.join(ROOT, "scripts/garage.sh"), d, str(port), "1"], check=True)
    env = dict(re.findall(r"export (\w+)=(\S+)", open(os.path.join(d, "env")).read()))
    with open(os.path.join(d, "secret"), "w") as f:
        f.write(env["AWS_SECRET_ACCESS_KEY"])
    return d, env


def _free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def node_args(args, work, name, reg_dir, reg_port, port, admin, store=None, peers=None):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    cmd = [args.regproxy, "run", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
           "--ca-dir", os.path.join(d, "ca"), "--cache-dir", os.path.join(d, "cache"),
           "--intercept", "registry.test", "--resolve", f"registry.test:{reg_port}=127.0.0.1:{reg_port}",
           "--upstream-ca", os.path.join(reg_dir, "ca.crt"), "--allow-port", str(reg_port)]
    if store:
        gdir, env = store
        cmd += ["--shared-store", "s3://regproxy/bench", "--shared-store-endpoint", env["S3_ENDPOINT"],
                "--shared-store-region", "garage", "--access-key-id", env["AWS_ACCESS_KEY_ID"],
                "--secret-access-key-file", os.path.join(gdir, "secret")]
    if peers:
        urls, secret = peers
        for u in urls:
            cmd += ["--peer", u]
        cmd += ["--advertise", f"http://127.0.0.1:{port}", "--peer-secret-file", secret]
    return d, cmd


def start_fleet(args, work, label, reg_dir, reg_port, store=None):
    ports = [free_port() for _ in range(args.nodes)]
    secret = os.path.join(work, "peer-secret")
    with open(secret, "w") as f:
        f.write("bench-fleet-secret-0123456789abcdef")
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    nodes = []
    for i, port in enumerate(ports):
        peers = (urls, secret) if store else None
        d, cmd = node_args(args, work, f"{label}{i}", reg_dir, reg_port, port, free_port(), store, peers)
        log = open(os.path.join(d, "log"), "w")
        PROCS.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_port(port)
        certs = os.path.join(d, "certs")
        os.makedirs(certs, exist_ok=True)
        for _ in range(50):
            if os.path.exists(os.path.join(d, "ca", "ca.crt")):
                break
            time.sleep(0.1)
        shutil.copy(os.path.join(d, "ca", "ca.crt"), os.path.join(certs, "ca.crt"))
        nodes.append((port, certs))
    return nodes


def pull(node, image, dst):
    port, certs = node
    env = dict(os.environ, HTTPS_PROXY=f"http://127.0.0.1:{port}", NO_PROXY="")
    subprocess.run(["skopeo", "copy", "--insecure-policy", "--src-cert-dir", certs, image, f"oci:{dst}:latest"],
                   check=True, capture_output=True, env=env, timeout=600)


GET = re.compile(r'"GET (/v2/\S+/(?:blobs|manifests)/\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


def upstream_bytes(reg_dir, skip):
    text = open(os.path.join(reg_dir, "registry.log")).read()[skip:]
    return sum(int(m.group(3)) for m in GET.finditer(text) if m.group(2).startswith("2"))


def run_case(args, work, label, reg_dir, reg_port, image, store=None):
    nodes = start_fleet(args, work, label, reg_dir, reg_port, store)
    skip = len(open(os.path.join(reg_dir, "registry.log")).read())
    start = time.time()
    with ThreadPoolExecutor(args.pulls) as pool:
        jobs = [pool.submit(pull, nodes[i % len(nodes)], image, os.path.join(work, f"{label}-dst{i}"))
                for i in range(args.pulls)]
        for j in jobs:
            j.result()
    took = time.time() - start
    time.sleep(0.5)  # the registry logs a line just after the response
    return upstream_bytes(reg_dir, skip), took


def parser():
    """fleet.py's flags; the main bench takes its defaults from here too."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regproxy", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--pulls", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", default="16MiB")
    p.add_argument("--out", default=os.path.join(HERE, "FLEET.md"))
    return p


def measure(args):
    """(image bytes, [(label, upstream bytes, wall s)]) of the two fleets, alone then shared. Every
    process started is killed and the temp dir removed before it returns."""
    work = tempfile.mkdtemp(prefix="regproxy-fleet-")
    try:
        src = os.path.join(work, "src")
        subprocess.run([sys.executable, os.path.join(ROOT, "tests/support/mkimage.py"), src, "--layers",
                        str(args.layers), "--size", args.size, "--seed", "7"], check=True, capture_output=True)
        image_bytes = sum(os.path.getsize(os.path.join(src, "blobs/sha256", b))
                          for b in os.listdir(os.path.join(src, "blobs/sha256")))
        reg_dir, reg_port = start_registry(work)
        ref = f"registry.test:{reg_port}/fleet/app:v1"
        push(src, reg_dir, reg_port)
        image = f"docker://{ref}"
        store = start_garage(work)
        rows = []
        for label, s in (("alone", None), ("shared", store)):
            up, took = run_case(args, work, label, reg_dir, reg_port, image, s)
            rows.append((label, up, took))
            print(f"{label}: {up} upstream bytes for an image of {image_bytes} ({up / image_bytes:.2f}), {took:.1f} s",
                  file=sys.stderr)
        return image_bytes, rows
    finally:
        for proc in PROCS:
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        PROCS.clear()
        for pidfile in ("registry/pid", "garage/pids"):
            path = os.path.join(work, pidfile)
            if os.path.exists(path):
                subprocess.run(["sh", "-c", f"kill -9 $(cat {path}) 2>/dev/null"], check=False)
        shutil.rmtree(work, ignore_errors=True)


def garage_missing():
    """Why the fleet cannot be measured here (scripts/garage.sh finds no garage), or None."""
    if shutil.which("garage") or os.access(os.path.expanduser("~/.cargo/bin/garage"), os.X_OK):
        return None
    return "Garage is not installed (scripts/garage.sh needs `garage`; scripts/test.sh builds it)"


def main():
    args = parser().parse_args()
    image_bytes, rows = measure(args)
    write(args, image_bytes, rows)


def push(src, reg_dir, reg_port):
    """Pushes straight to the origin (127.0.0.1, trusting its CA)."""
    certs = os.path.join(reg_dir, "certs.d")
    os.makedirs(certs, exist_ok=True)
    shutil.copy(os.path.join(reg_dir, "ca.crt"), os.path.join(certs, "ca.crt"))
    subprocess.run(["skopeo", "copy", "--insecure-policy", "--dest-cert-dir", certs, "--preserve-digests",
                    f"oci:{src}:latest", f"docker://127.0.0.1:{reg_port}/fleet/app:v1"],
                   check=True, capture_output=True, timeout=600)


LABELS = {"alone": "nodes alone (own disk only)", "shared": "shared store + peers"}


def table(image_bytes, rows):
    """The Markdown table of the two fleets."""
    lines = ["| fleet | upstream bytes | ÷ image bytes (goal 1.0 shared) | wall time, s |", "|---|---|---|---|"]
    for label, up, took in rows:
        lines.append(f"| {LABELS[label]} | {up} | {up / image_bytes:.2f} | {took:.1f} |")
    return lines


def goals(args, image_bytes, rows):
    """(text, value, ok, shown) per goal: the shared fleet carries the image across the origin link
    once; nodes alone carry it once each, which shows that the count sees every copy."""
    ratio = {label: up / image_bytes for label, up, _ in rows}
    shared, alone = ratio.get("shared"), ratio.get("alone")
    n = args.nodes
    return [
        (f"fleet: {args.pulls} cold pulls over {n} nodes sharing a store, origin bytes ÷ one image ≤ 1.01 "
         "(the uplink carries it once)", shared, shared is not None and shared <= 1.01,
         "n/a" if shared is None else f"{shared:.2f}"),
        (f"fleet: the same {n} nodes alone, origin bytes ÷ one image = {n} (once per node: the count sees "
         "every copy)", alone, alone is not None and abs(alone - n) <= 0.01 * n,
         "n/a" if alone is None else f"{alone:.2f}"),
    ]


def write(args, image_bytes, rows):
    lines = [
        "# The fleet case",
        "",
        f"`python3 bench/fleet.py --regproxy target/release/regproxy --nodes {args.nodes} --pulls {args.pulls}"
        f" --layers {args.layers} --size {args.size}`, {time.strftime('%Y-%m-%d')}.",
        "",
        f"{args.pulls} concurrent cold pulls of one image ({image_bytes} bytes) spread over {args.nodes} nodes;"
        " upstream bytes are the sizes of the origin's 2xx GETs of blobs and manifests.",
        "",
    ] + table(image_bytes, rows)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
