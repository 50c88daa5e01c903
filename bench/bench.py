#!/usr/bin/env python3
"""regproxy against the tools people would otherwise use, on this machine, in one run.

    bench/run [--quick] [--rounds N] [--out FILE]          # installs what is missing, builds, runs this
    python3 bench/bench.py --regproxy PATH [--quick] ...    # this script alone

Origin: Debian's docker-registry over TLS on 127.0.0.1 (as registry.test), holding three generated
images: big (1 layer of 200 MiB), many (100 layers of 64 KiB), huge (1 layer of 1 GiB; 256 MiB in
--quick). Peers: direct access, a blind CONNECT tunnel, regproxy, distribution in proxy (pull-through)
mode, an nginx MITM cache like rpardini/docker-registry-proxy, mitmproxy. Every pull is timed with
skopeo; the 200 MiB image also with containerd's ctr. Everything listens on 127.0.0.1; every
process started is killed and the temp dir removed at the end. Writes bench/RESULTS.md (median, min, max of the rounds; ratios to direct and tunnel).

WAN profiles (--sections wan): every peer again, its upstream traffic (and direct clients') through
bench/wan.py, a shaping relay in front of the origin: a site uplink (200 Mbit/s shared, 20 ms each
way) and a long fat path (60 ms each way, 40 Mbit/s per connection, 500 Mbit/s in all). CPU per GiB:
the TLS-terminating peers' utime + stime per GiB pulled, against a floor that `openssl speed`
measures in the same run for the suites regproxy negotiated. On the site uplink, a concurrency sweep
(--clients 1,2,4,8): that many cold pulls at once, direct and through regproxy, plotted with matplotlib
(bench/plots.py) next to the report.

The fleet (--sections fleet): bench/fleet.py's two fleets of regproxy nodes, alone and sharing a Garage
store: how many times an image crosses the origin link.
"""
import argparse, datetime, http.client, json, os, platform, re, resource, shutil, signal, socket, ssl
import statistics, subprocess, sys, tempfile, threading, time

import fleet
import plots
import small

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "registry.test"
MiB = 1 << 20
GiB = 1 << 30
CONC = 8

# WAN profiles: key, title, one-way delay (ms), Mbit/s per direction shared by all connections,
# Mbit/s per connection (0: no cap of its own).
UPLINK = ("uplink", "Site uplink", 20, 200, 0)
FAT = ("fat", "Long fat path", 60, 500, 40)
W_COLD = "Site uplink: pull 1 × 200 MiB, cold"
W_WARM = "Site uplink: pull 1 × 200 MiB, warm (origin up, across the link)"
SWEEP = "Site uplink: {n} concurrent cold pulls of 1 × 200 MiB (wall time)"
W_CONC = SWEEP.format(n=CONC)
W_CONCR = f"Site uplink: {CONC} concurrent cold pulls ÷ one direct cold pull"
W_LINK = f"Site uplink: MiB carried from the origin across the link, {CONC} concurrent cold pulls"
NCPUS = os.cpu_count() or 1
W_CPU1 = f"Site uplink: CPU time of client + origin + proxy + relay ÷ {NCPUS} CPUs, one cold pull"
W_CPU8 = f"Site uplink: CPU time of clients + origin + proxy + relay ÷ {NCPUS} CPUs, {CONC} concurrent cold pulls"
W_CLI8 = f"Site uplink: CPU time of the {CONC} clients (skopeo) alone ÷ {NCPUS} CPUs, {CONC} concurrent cold pulls"
W_TAIL1 = "Site uplink: seconds from the last byte across the link to the end of the pull, one cold pull"
W_TAIL8 = f"Site uplink: seconds from the last byte across the link to the end of the pulls, {CONC} concurrent cold pulls"
F_COLD = "Long fat path: two clients at once, 1 × 64 MiB and 8 × 4 MiB, cold (wall time)"
F_CONNS = "Long fat path: TCP connections opened across the link during the two pulls"
W_PAUSE1 = "Site uplink: the link's longest pause between the origin's first and last byte, one cold pull"
W_PAUSE8 = f"Site uplink: the link's longest pause between the origin's first and last byte, {CONC} concurrent cold pulls"
WAN_CASES = (W_COLD, W_WARM, W_CONC, W_CONCR, W_LINK, W_CPU1, W_CPU8, W_CLI8, W_TAIL1, W_TAIL8, W_PAUSE1, W_PAUSE8,
             F_COLD, F_CONNS)
# CPU seconds per GiB pulled, of the processes that terminate TLS.
G_LC, G_LW = "loopback cold", "loopback warm"
G_UC, G_UW = "site uplink cold", "site uplink warm"
CPU_CASES = (G_LC, G_LW, G_UC, G_UW)
CPU_KIND = {G_LC: "cold", G_LW: "warm", G_UC: "cold", G_UW: "warm"}  # which floor each case is held against

PROCS = []  # every Popen we start, killed in the finally


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def spawn(cmd, logfile, env=None, mode="ab"):
    f = open(logfile, mode)
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    f.close()
    PROCS.append(p)
    return p


def kill(p, sig=signal.SIGTERM, timeout=10):
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def wait_port(port, proc=None, timeout=30, tls_ca=None, path=None):
    """Wait until 127.0.0.1:port accepts (and, with tls_ca/path, answers an HTTPS GET)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            if path is None:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return
            ctx = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
            c = (http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2) if tls_ca
                 else http.client.HTTPConnection("127.0.0.1", port, timeout=2))
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}")


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (field 3, the state, first): the name
    is in parentheses and may hold spaces."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree_pids(pid):
    """pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(stat_fields(d)[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_hwm_mib(pid):
    return sum(vm_hwm_kib(p) for p in tree_pids(pid)) / 1024


def nice_of(pid):
    """The nice value of a process (field 19 of /proc/PID/stat)."""
    return int(stat_fields(pid)[16])


def cpu_s(pids):
    """User + system CPU seconds used so far by the live processes `pids` and their descendants."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in {q for p in pids if p for q in tree_pids(p)}:
        try:
            fields = stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


def children_cpu_s():
    """CPU seconds of this process's finished, waited-for children (the skopeo clients)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def certdir_with(work, name, ca_file):
    d = os.path.join(work, "certdirs", name)
    os.makedirs(d, exist_ok=True)
    shutil.copy(ca_file, os.path.join(d, "ca.crt"))
    return d


# ---------------------------------------------------------------- certificates

def openssl_ca(d, cn):
    os.makedirs(d, exist_ok=True)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "30", "-subj", f"/CN={cn}", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])


def openssl_leaf(d, name):
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", f"/CN={name}", "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr"])
    with open(f"{d}/ext.cnf", "w") as f:
        f.write(f"subjectAltName=DNS:{name},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
         "-CAcreateserial", "-days", "30", "-extfile", f"{d}/ext.cnf", "-out", f"{d}/server.crt"])


# ---------------------------------------------------------------- registries (origin and mirror)

def registry_config(path, data, port, certdir, proxy_remote=None):
    cfg = f"""version: 0.1
log:
  level: warn
  formatter: json
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  tls:
    certificate: {certdir}/server.crt
    key: {certdir}/server.key
"""
    if proxy_remote:
        cfg += f"proxy:\n  remoteurl: {proxy_remote}\n"
    with open(path, "w") as f:
        f.write(cfg)


class Origin:
    def __init__(self, work):
        self.dir = os.path.join(work, "origin")
        self.port = free_port()
        openssl_ca(self.dir, "bench origin CA")
        openssl_leaf(self.dir, HOST)
        self.ca = os.path.join(self.dir, "ca.crt")
        self.certdir = certdir_with(work, "origin", self.ca)
        self.log = os.path.join(self.dir, "registry.log")
        self.cfg = os.path.join(self.dir, "config.yml")
        registry_config(self.cfg, os.path.join(self.dir, "data"), self.port, self.dir)
        self.proc = None

    def start(self):
        self.proc = spawn(["docker-registry", "serve", self.cfg], self.log)
        wait_port(self.port, self.proc, tls_ca=self.ca, path="/v2/")

    def stop(self):
        kill(self.proc)
        self.proc = None

    def log_size(self):
        return os.path.getsize(self.log)

    def blob_carried(self, since, layout):
        """{digest: times carried} of the blobs of the image at `layout`: the bytes of every 2xx GET
        of the blob (whole or ranged) in the access log after byte offset `since`, ÷ its size."""
        time.sleep(0.3)  # the access line is written just after the response
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        sent = {}
        for line in text.splitlines():
            m = re.search(r'\] "GET /v2/\S+/blobs/(sha256:[0-9a-f]+) HTTP/[\d.]+" (2\d\d) (\d+) ', line)
            if m:
                sent[m.group(1)] = sent.get(m.group(1), 0) + int(m.group(3))
        blobs = os.path.join(layout, "blobs", "sha256")
        return {d: n / max(1, os.path.getsize(os.path.join(blobs, d.split(":")[1])))
                for d, n in sent.items() if os.path.exists(os.path.join(blobs, d.split(":")[1]))}


# ---------------------------------------------------------------- peers

class Peer:
    name = "?"
    caching = False       # keeps blobs: has a cold and a warm (origin stopped) case
    o = None              # the Origin
    up = None             # the port that reaches it: the origin's own, or a WAN link's in front of it
    tag = ""              # suffix of the peer's files, so that a second instance (behind a link) has its own
    terminates_tls = False  # decrypts and encrypts the bytes it passes on (its CPU per GiB is compared)

    def route(self, origin, up=None, tag=""):
        self.o, self.up, self.tag = origin, up or origin.port, tag
    def start(self): pass
    def fresh(self): pass  # empty cache, started
    def stop(self): pass
    def stop_all(self):  # stop() may keep helpers for the next start (nginx's CONNECT front); this ends them too
        self.stop()
    def pull(self, image):  # (ref, HTTPS_PROXY or None, cert dir)
        raise NotImplementedError
    def curl_args(self, image, digest):
        raise NotImplementedError
    def rss_pid(self):
        return None
    def cpu_pids(self):  # processes (with their descendants) whose CPU time is the proxy's
        return [self.rss_pid()]
    def tls_pids(self):  # those of them that terminate TLS (nginx: not its CONNECT front)
        return self.cpu_pids()


class Direct(Peer):
    name = "direct"
    def __init__(self, origin, up=None, tag=""):
        self.route(origin, up, tag)
    def pull(self, image):
        return f"127.0.0.1:{self.up}/test/{image}:latest", None, self.o.certdir
    def curl_args(self, image, digest):
        return ["--cacert", self.o.ca, "--resolve", f"{HOST}:{self.o.port}:127.0.0.1",
                f"https://{HOST}:{self.o.port}/v2/test/{image}/blobs/{digest}"]


class ViaProxy(Peer):
    """A peer reached as HTTPS_PROXY, the client trusting `self.ca`."""
    def proxy(self):
        return f"http://127.0.0.1:{self.port}"
    def pull(self, image):
        return f"{HOST}:{self.o.port}/test/{image}:latest", self.proxy(), self.certdir
    def curl_args(self, image, digest):
        return ["--proxy", self.proxy(), "--cacert", self.ca,
                f"https://{HOST}:{self.o.port}/v2/test/{image}/blobs/{digest}"]


class Tunnel(ViaProxy):
    name = "tunnel"
    def __init__(self, work, origin, up=None, tag=""):
        self.route(origin, up, tag)
        self.work, self.port, self.proc = work, free_port(), None
        self.ca, self.certdir = origin.ca, origin.certdir
    def start(self):
        self.proc = spawn([sys.executable, os.path.join(HERE, "tunnel.py"), "--listen", f"127.0.0.1:{self.port}",
                           "--map", f"{HOST}:{self.o.port}=127.0.0.1:{self.up}"],
                          os.path.join(self.work, f"tunnel{self.tag}.log"))
        wait_port(self.port, self.proc)
    def stop(self):
        kill(self.proc)
    def rss_pid(self):
        return self.proc.pid


class Regproxy(ViaProxy):
    name = "regproxy"
    terminates_tls = True
    caching = True
    def __init__(self, work, origin, binary, up=None, tag="", extra=()):
        self.route(origin, up, tag)
        self.work, self.bin, self.extra = work, binary, list(extra)
        self.port, self.admin = free_port(), free_port()
        self.cadir = os.path.join(work, "regproxy-ca")
        self.log = os.path.join(work, f"regproxy{tag}.log")
        self.proc, self.n = None, 0
        self.ca = os.path.join(self.cadir, "ca.crt")
        self.certdir = None
    def start(self):
        self.n += 1
        self.cache = os.path.join(self.work, f"regproxy-cache{self.tag}-{self.n}")
        self.proc = spawn([self.bin, "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
                           "--ca-dir", self.cadir, "--cache-dir", self.cache, "--intercept", HOST,
                           "--intercept", "*.bench.test",
                           "--resolve", f"{HOST}:{self.o.port}=127.0.0.1:{self.up}",
                           "--upstream-ca", self.o.ca, "--allow-port", str(self.o.port), "--log-format", "text"]
                          + self.extra,
                          self.log, env=dict(os.environ, REGPROXY_LOG="info,regproxy::tls=debug"))
        wait_port(self.admin, self.proc, path="/healthz")
        wait_port(self.port, self.proc)
        if self.certdir is None:
            self.certdir = certdir_with(self.work, "regproxy", self.ca)
    def stop(self):
        kill(self.proc)
        if getattr(self, "cache", None):
            shutil.rmtree(self.cache, ignore_errors=True)
    def fresh(self):
        self.stop()
        self.start()
    def rss_pid(self):
        return self.proc.pid
    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()


class Mirror(Peer):
    """distribution (Debian's docker-registry) in proxy mode: a pull-through mirror, pulled from directly."""
    name = "distribution"
    terminates_tls = True
    caching = True
    def __init__(self, work, origin, up=None, tag=""):
        self.route(origin, up, tag)
        self.work, self.port, self.proc, self.n = work, free_port(), None, 0
        self.bundle = os.path.join(work, "mirror-roots.pem")
        with open(self.bundle, "wb") as out:
            for f in ("/etc/ssl/certs/ca-certificates.crt", origin.ca):
                if os.path.exists(f):
                    with open(f, "rb") as i:
                        out.write(i.read() + b"\n")
    def start(self):
        self.n += 1
        self.data = os.path.join(self.work, f"mirror-data{self.tag}-{self.n}")
        cfg = os.path.join(self.work, f"mirror{self.tag}.yml")
        # The origin's server certificate has IP:127.0.0.1, so the mirror reaches it as 127.0.0.1 (no
        # /etc/hosts change) and serves clients with the same certificate.
        registry_config(cfg, self.data, self.port, self.o.dir, proxy_remote=f"https://127.0.0.1:{self.up}")
        env = {k: v for k, v in os.environ.items()}
        env["SSL_CERT_FILE"] = self.bundle
        self.proc = spawn(["docker-registry", "serve", cfg], os.path.join(self.work, f"mirror{self.tag}.log"), env=env)
        wait_port(self.port, self.proc, tls_ca=self.o.ca, path="/v2/")
    def stop(self):
        kill(self.proc)
        if getattr(self, "data", None):
            shutil.rmtree(self.data, ignore_errors=True)
    def fresh(self):
        self.stop()
        self.start()
    def pull(self, image):
        return f"127.0.0.1:{self.port}/test/{image}:latest", None, self.o.certdir
    def curl_args(self, image, digest):
        return ["--cacert", self.o.ca, f"https://127.0.0.1:{self.port}/v2/test/{image}/blobs/{digest}"]
    def rss_pid(self):
        return self.proc.pid


NGINX_CONF = """
user root;
worker_processes auto;
daemon off;
master_process on;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    log_format cache '$request $status $upstream_cache_status $body_bytes_sent';
    access_log {w}/access.log cache;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    client_max_body_size 0;

    # as rpardini/docker-registry-proxy: one disk cache, keyed by URI, entries kept for 60 days
    proxy_cache_path {w}/cache levels=1:2 keys_zone=cache:16m max_size=32g inactive=60d use_temp_path=off;

    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {host};
        ssl_certificate {w}/server.crt;
        ssl_certificate_key {w}/server.key;
        ssl_session_cache shared:SSL:10m;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_ssl_server_name on;
        proxy_ssl_name {host};
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {origin_ca};
        proxy_ssl_session_reuse on;
        proxy_read_timeout 900s;
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;
        proxy_hide_header Set-Cookie;
        proxy_cache cache;
        proxy_cache_key $uri;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 880s;
        proxy_cache_lock_age 880s;
        add_header X-Docker-Registry-Proxy-Cache-Status $upstream_cache_status;

        # blobs and manifests by digest: immutable, cached for 60 days
        location ~ ^/v2/.*/blobs/sha256:[0-9a-f]+$ {{
            proxy_cache_valid 200 206 60d;
            proxy_pass https://origin;
        }}
        location ~ ^/v2/.*/manifests/sha256:[0-9a-f]+$ {{
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 60d;
            proxy_pass https://origin;
        }}
        # tags and the /v2/ ping: cached 1s, served stale while the origin is down
        location ~ ^/v2/.*/manifests/ {{
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 1s;
            proxy_cache_use_stale error timeout invalid_header updating http_500 http_502 http_503 http_504;
            proxy_pass https://origin;
        }}
        location = /v2/ {{
            proxy_cache_valid 200 1s;
            proxy_cache_use_stale error timeout invalid_header updating http_500 http_502 http_503 http_504;
            proxy_pass https://origin;
        }}
        location / {{
            proxy_cache off;
            proxy_pass https://origin;
        }}
    }}
}}
"""


class Nginx(ViaProxy):
    """nginx MITM cache the way rpardini/docker-registry-proxy does it: a CONNECT front (there, nginx with
    the proxy_connect module; here tunnel.py) sends registry.test to nginx's TLS server, which has a leaf
    for registry.test signed by its own CA and caches with proxy_cache + proxy_cache_lock."""
    name = "nginx"
    terminates_tls = True
    caching = True
    def __init__(self, work, origin, up=None, tag=""):
        self.route(origin, up, tag)
        self.work = work
        self.w = os.path.join(work, f"nginx{tag}")
        openssl_ca(self.w, "bench nginx MITM CA")
        openssl_leaf(self.w, HOST)
        self.ca = os.path.join(self.w, "ca.crt")
        self.certdir = certdir_with(work, "nginx", self.ca)
        self.port, self.tls_port = free_port(), free_port()
        self.front = self.proc = None
        self.conf = os.path.join(self.w, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(NGINX_CONF.format(w=self.w, port=self.tls_port, host=HOST, origin_port=self.up,
                                      origin_ca=origin.ca))
    def start(self):
        for d in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi", "cache"):
            os.makedirs(os.path.join(self.w, d), exist_ok=True)
        if self.front is None:
            self.front = spawn([sys.executable, os.path.join(HERE, "tunnel.py"), "--listen", f"127.0.0.1:{self.port}",
                                "--map", f"{HOST}:{self.o.port}=127.0.0.1:{self.tls_port}"],
                               os.path.join(self.work, f"nginx-front{self.tag}.log"))
            wait_port(self.port, self.front)
        self.proc = spawn(["nginx", "-p", self.w, "-c", self.conf, "-e", os.path.join(self.w, "error.log")],
                          os.path.join(self.w, "stdout.log"))
        wait_port(self.tls_port, self.proc)
    def stop(self):
        kill(self.proc)
        shutil.rmtree(os.path.join(self.w, "cache"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.w, "tmp"), ignore_errors=True)
    def stop_all(self):
        self.stop()
        kill(self.front)
    def fresh(self):
        self.stop()
        self.start()
    def rss_pid(self):
        return self.proc.pid
    def cpu_pids(self):
        return [self.proc.pid, self.front.pid]
    def tls_pids(self):
        return [self.proc.pid]
    def cache_statuses(self, kind="/blobs/"):
        """{status: count} of the cache statuses in the access log of requests whose path has `kind`."""
        counts = {}
        try:
            with open(os.path.join(self.w, "access.log")) as f:
                for line in f:
                    if kind in line:
                        st = line.split()[-2]
                        counts[st] = counts.get(st, 0) + 1
        except OSError:
            pass
        return counts


class Mitm(ViaProxy):
    name = "mitmproxy"
    terminates_tls = True
    def __init__(self, work, origin, mitmdump, up=None, tag=""):
        self.route(origin, up, tag)
        self.work, self.bin = work, mitmdump
        self.port, self.proc = free_port(), None
        self.conf = os.path.join(work, "mitmproxy")
        self.ca = os.path.join(self.conf, "mitmproxy-ca-cert.pem")
        self.certdir = None
    def start(self):
        env = dict(os.environ, BENCH_MITM_MAP=f"{HOST}:{self.o.port}=127.0.0.1:{self.up},{HOST}=127.0.0.1,"
                                              "*.bench.test=127.0.0.1")
        self.proc = spawn([self.bin, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                           "--set", f"confdir={self.conf}", "--set", "stream_large_bodies=1m",
                           "--set", f"ssl_verify_upstream_trusted_ca={self.o.ca}",
                           "--set", "connection_strategy=lazy",
                           "-s", os.path.join(HERE, "mitm_resolve.py")],
                          os.path.join(self.work, f"mitmproxy{self.tag}.log"), env=env)
        wait_port(self.port, self.proc)
        for _ in range(100):
            if os.path.exists(self.ca):
                break
            time.sleep(0.05)
        if self.certdir is None:
            self.certdir = certdir_with(self.work, "mitmproxy", self.ca)
    def stop(self):
        kill(self.proc)
    def rss_pid(self):
        return self.proc.pid


# ---------------------------------------------------------------- clients

class Clients:
    def __init__(self, work):
        self.work = work
        self.n = 0
        self.regconf = os.path.join(work, "registries.conf")
        open(self.regconf, "w").close()
        self.auth = os.path.join(work, "auth.json")
        with open(self.auth, "w") as f:
            f.write('{"auths":{}}')

    def env(self, proxy):
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(CONTAINERS_REGISTRIES_CONF=self.regconf, REGISTRY_AUTH_FILE=self.auth)
        if proxy:
            env["HTTPS_PROXY"] = proxy
        return env

    def skopeo(self, ref, proxy, certdir):
        self.n += 1
        dest = os.path.join(self.work, f"pull-{self.n}")
        cmd = ["skopeo", "copy", "-q", "--src-cert-dir", certdir, f"docker://{ref}", f"oci:{dest}:latest"]
        return subprocess.Popen(cmd, env=self.env(proxy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL), dest

    def pull(self, peer, image, n=1):
        """Wall time of n concurrent skopeo pulls of image through peer."""
        return self.pull_all(peer, [image] * n)

    def pull_all(self, peer, images):
        """Wall time of concurrent skopeo pulls through peer, one per image in `images`."""
        image = ",".join(sorted(set(images)))
        t0 = time.monotonic()
        procs = [self.skopeo(*peer.pull(i)) for i in images]
        errors = []
        for p, dest in procs:
            out = p.communicate()[0]
            if p.returncode != 0:
                errors.append(out.decode(errors="replace").strip()[-400:])
        dt = time.monotonic() - t0
        for _, dest in procs:
            shutil.rmtree(dest, ignore_errors=True)
        if errors:
            raise RuntimeError(f"skopeo pull of {image} via {peer.name} failed: {errors[0]}")
        return dt

    def curl_mibps(self, args):
        out = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
                             + args, env=self.env(None), check=True, capture_output=True, text=True).stdout
        size, t = out.split()
        return int(size) / MiB / float(t), int(size)


class Ctr:
    """containerd's client as a second puller: a private containerd whose namespaces do not share
    content, and `ctr content fetch` (every blob of the image, through the peer, not unpacked)
    in a new namespace per pull, so that each pull downloads everything."""
    def __init__(self, work):
        self.dir = os.path.join(work, "containerd")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.conf = os.path.join(self.dir, "config.toml")
        with open(self.conf, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.dir}/ttrpc.sock"\n'
                    '[plugins."io.containerd.metadata.v1.bolt"]\n  content_sharing_policy = "isolated"\n')
        self.proc, self.n = None, 0

    def start(self):
        self.proc = spawn(["containerd", "--config", self.conf], os.path.join(self.dir, "containerd.log"))
        end = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("containerd did not start")
            time.sleep(0.05)

    def stop(self):
        kill(self.proc)

    def pull(self, clients, peer, image):
        """Wall time of one `ctr content fetch` of image through peer."""
        ref, proxy, certdir = peer.pull(image)
        host = ref.split("/", 1)[0]
        hosts = os.path.join(self.dir, "hosts", peer.name)
        os.makedirs(os.path.join(hosts, host), exist_ok=True)
        with open(os.path.join(hosts, host, "hosts.toml"), "w") as f:
            f.write(f'server = "https://{host}"\n[host."https://{host}"]\n  ca = "{certdir}/ca.crt"\n')
        self.n += 1
        ctr = ["ctr", "-a", self.sock, "-n", f"pull{self.n}"]
        t0 = time.monotonic()
        r = subprocess.run(ctr + ["content", "fetch", "--hosts-dir", hosts, ref], env=clients.env(proxy),
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"ctr content fetch of {image} via {peer.name} failed: {(r.stdout + r.stderr)[-400:]}")
        digests = subprocess.run(ctr + ["content", "ls", "-q"], capture_output=True, text=True).stdout.split()
        if digests:
            subprocess.run(ctr + ["content", "rm"] + digests, capture_output=True)
        return dt


def make_peers(a, work, origin, res, up=None, tag=""):
    """The peers named by --peers, reaching the origin on port `up` (a WAN link's) if given."""
    make = {"direct": lambda: Direct(origin, up, tag), "tunnel": lambda: Tunnel(work, origin, up, tag),
            "regproxy": lambda: Regproxy(work, origin, a.regproxy, up, tag, a.regproxy_args.split()),
            "distribution": lambda: Mirror(work, origin, up, tag), "nginx": lambda: Nginx(work, origin, up, tag),
            "mitmproxy": lambda: Mitm(work, origin, a.mitmdump, up, tag)}
    peers = []
    for n in a.peers.split(","):
        if n == "mitmproxy" and not os.path.exists(a.mitmdump):
            if not tag:
                res.notes.append("mitmproxy: mitmdump not found, peer skipped.")
            continue
        peers.append(make[n]())
    return peers


def measured(clients, origin, p, images):
    """Wall time of concurrent pulls of `images` through p, and the CPU seconds they cost:
    client (the skopeo processes), proxy (all of the peer's processes), tls (those that terminate
    TLS), origin."""
    pids, tls = p.cpu_pids(), p.tls_pids()
    opid = [origin.proc.pid] if origin.proc else []
    c0, o0, p0, t0 = children_cpu_s(), cpu_s(opid), cpu_s(pids), cpu_s(tls)
    wall = clients.pull_all(p, images)
    cpu = {"client": children_cpu_s() - c0, "origin": cpu_s(opid) - o0, "proxy": cpu_s(pids) - p0,
           "tls": cpu_s(tls) - t0}
    return wall, cpu


class Link:
    """bench/wan.py in front of the origin: one shaped link that a set of peers' upstream traffic
    (and direct clients') crosses."""
    def __init__(self, work, origin, profile):
        key, _, delay, mbit, flow = profile
        self.key, self.o, self.work, self.port, self.proc = key, origin, work, free_port(), None
        self.args = ["--delay-ms", str(delay), "--mbit", str(mbit), "--flow-mbit", str(flow)]
        self.stats = os.path.join(work, f"wan-{key}.stats")
    def start(self):
        self.proc = spawn([sys.executable, os.path.join(HERE, "wan.py"), "--listen", f"127.0.0.1:{self.port}",
                           "--to", f"127.0.0.1:{self.o.port}", "--stats", self.stats] + self.args,
                          os.path.join(self.work, f"wan-{self.key}.log"))
        wait_port(self.port, self.proc)
        self.nice = nice_of(self.proc.pid)
    def stop(self):
        kill(self.proc)
    def carried(self):
        """(bytes to the origin, bytes from it, connections) so far."""
        time.sleep(0.3)  # the relay writes its counters every 100 ms
        return self.counters()
    def counters(self):
        with open(self.stats) as f:
            up, down, conns = (int(x) for x in f.read().split())
        return up, down, conns


class LinkWatch:
    """Notes when the bulk of the bytes from the origin had crossed the link (all but the last
    64 KiB: pings, window updates and TLS alerts go on trickling), to within the relay's 100 ms
    counter ticks, while in a `with` block."""
    def __init__(self, link):
        self.link, self.seen, self.done = link, [], threading.Event()
    def __enter__(self):
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self
    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
    def watch(self):
        while not self.done.wait(0.05):
            try:
                self.seen.append((time.monotonic(), self.link.counters()[1]))
            except (OSError, ValueError):  # the relay is rewriting the file
                continue
    @property
    def longest_pause(self):
        """The longest time the bytes from the origin stood still (moved under 64 KiB) between
        the first and the last of them, to within the counters' 100 ms ticks."""
        if not self.seen:
            return 0.0
        final = self.seen[-1][1]
        mark_t, mark_down, longest = None, self.seen[0][1], 0.0
        for t, down in self.seen:
            if down - mark_down > 64 * 1024 or (mark_t is not None and down >= final - 64 * 1024):
                if mark_t is not None:
                    longest = max(longest, t - mark_t)
                mark_t, mark_down = t, down
            if down >= final - 64 * 1024 and mark_t is not None:
                break
        return max(0.0, longest - 0.1)  # a counter tick is no pause

    @property
    def last(self):
        if not self.seen:
            return time.monotonic()
        final = self.seen[-1][1]
        return next(t for t, down in self.seen if down >= final - 64 * 1024)


def uplink_round(clients, origin, link, peers, res, size, r):
    """One round of the site uplink: a cold pull per peer, a warm one per caching peer, then
    CONC concurrent cold pulls per caching peer. Returns failures."""
    failures = []
    def attempt(what, p, f):
        try:
            f()
        except Exception as e:  # noqa: BLE001
            failures.append(f"round {r + 1}, {link.key}, {p.name}, {what}: {e}")
            log(failures[-1])
    caching = [p for p in peers if p.caching]
    for p in caching:
        p.fresh()
    def everyone(p, images):
        """Wall time, CPU of everything, and the TLS processes' CPU, of pulls of `images` through p;
        in `cpu["tail"]`, how long they went on after the last byte from the origin crossed the link."""
        r0 = cpu_s([link.proc.pid])
        with LinkWatch(link) as watch:
            start = time.monotonic()
            wall, cpu = measured(clients, origin, p, images)
        cpu["tail"] = max(0.0, start + wall - watch.last)
        cpu["pause"] = watch.longest_pause
        all_cpu = cpu["client"] + cpu["origin"] + cpu["proxy"] + cpu_s([link.proc.pid]) - r0
        return wall, all_cpu / NCPUS, cpu
    def pull(p, case, cpu_case):
        wall, all_cpu, cpu = everyone(p, ["big"])
        res.add(case, p.name, wall)
        if case == W_COLD:
            res.add(W_CPU1, p.name, all_cpu)
            res.add(W_TAIL1, p.name, cpu["tail"])
            res.add(W_PAUSE1, p.name, cpu["pause"])
        if p.terminates_tls:
            res.add(cpu_case, p.name, cpu["tls"] / (size / GiB))
        if not p.caching:
            res.add(W_WARM, p.name, wall)
    for p in peers:
        attempt("cold", p, lambda: pull(p, W_COLD, G_UC))
    for p in caching:
        attempt("warm", p, lambda: pull(p, W_WARM, G_UW))
    one = res.data.get((W_COLD, "direct"), [None])[-1]
    def concurrent(p):
        p.fresh()
        before = link.carried()
        wall, all_cpu, cpu = everyone(p, ["big"] * CONC)
        res.add(W_CONC, p.name, wall)
        res.add(W_CPU8, p.name, all_cpu)
        res.add(W_CLI8, p.name, cpu["client"] / NCPUS)
        res.add(W_TAIL8, p.name, cpu["tail"])
        res.add(W_PAUSE8, p.name, cpu["pause"])
        if one:
            res.add(W_CONCR, p.name, wall / one)
        res.add(W_LINK, p.name, (link.carried()[1] - before[1]) / MiB)
    for p in caching:
        attempt(f"{CONC} concurrent", p, lambda: concurrent(p))
    return failures


def sweep_case(n):
    """The case of n concurrent cold pulls of `big` on the site uplink: 1 and CONC are the uplink
    round's own cases, so the sweep does not pull them again."""
    return {1: W_COLD, CONC: W_CONC}.get(n, SWEEP.format(n=n))


def sweep_round(clients, link, peers, res, counts, r):
    """The concurrency sweep: per count, that many concurrent cold pulls of `big` by direct clients
    and through regproxy (fresh cache), wall time until all finished; the points the uplink round
    measured already are not pulled again. Returns failures."""
    failures = []
    one = res.data.get((W_COLD, "direct"), [None])[-1]
    for p in peers:
        for n in counts if p.name in ("direct", "regproxy") else ():
            if n == 1 or (n == CONC and p.caching):
                continue
            try:
                p.fresh()
                before = link.carried()
                wall = clients.pull(p, "big", n)
                res.add(sweep_case(n), p.name, wall)
                if n == CONC:  # direct's own figures for the uplink round's tables
                    res.add(W_LINK, p.name, (link.carried()[1] - before[1]) / MiB)
                    if one:
                        res.add(W_CONCR, p.name, wall / one)
            except Exception as e:  # noqa: BLE001
                failures.append(f"round {r + 1}, {link.key}, {p.name}, {n} concurrent (sweep): {e}")
                log(failures[-1])
    return failures


def sweep_lines(res, counts, png):
    """The sweep's table: wall time per count of concurrent clients, direct and regproxy."""
    L = ["### Site uplink: pull time against concurrent clients", "",
         f"Cold pulls of `big` (1 × 200 MiB) by {', '.join(map(str, counts))} skopeo clients started together, "
         "direct and through regproxy (a fresh cache for each count), wall time until all finished. The points for "
         f"1 client and regproxy's for {CONC} are the cases above (the same pulls); the others are pulled in the first "
         "WAN round only, unless `--wan-rounds` is given.", "",
         "| clients | direct | regproxy | regproxy ÷ direct |", "|---:|---:|---:|---:|"]
    for n in counts:
        d, g = res.data.get((sweep_case(n), "direct")), res.data.get((sweep_case(n), "regproxy"))
        ratio = fmt(statistics.median(g) / statistics.median(d), "x") if d and g else "n/a"
        L.append(f"| {n} | {spread(d, 's')} | {spread(g, 's')} | {ratio} |")
    return L + ["", png, ""]


def fat_round(clients, origin, link, peers, res, r):
    """One round of the long fat path: per peer, two clients at once, one per image."""
    failures = []
    for p in peers:
        try:
            if p.caching:
                p.fresh()
            before = link.carried()
            wall, _ = measured(clients, origin, p, ["fat1", "fat8"])
            res.add(F_COLD, p.name, wall)
            res.add(F_CONNS, p.name, link.carried()[2] - before[2])
        except Exception as e:  # noqa: BLE001
            failures.append(f"round {r + 1}, {link.key}, {p.name}: {e}")
            log(failures[-1])
    return failures


def wan_phase(a, work, origin, clients, res, rounds, size):
    """Every peer again, each behind the WAN profiles' links in turn. Returns failures."""
    failures = []
    for profile in (UPLINK, FAT):
        if profile[0] not in a.profiles.split(","):
            continue
        link = Link(work, origin, profile)
        link.start()
        res.notes.append(f"{profile[1]}: the relay ran at nice {link.nice}.")
        peers = make_peers(a, work, origin, res, link.port, f"-{profile[0]}")
        try:
            for p in peers:
                p.start()
            for r in range(rounds):
                log(f"{profile[1]}: round {r + 1}/{rounds}")
                res.notes.append(load_note(f"{profile[1]}, round {r + 1}"))
                if profile is UPLINK:
                    failures += uplink_round(clients, origin, link, peers, res, size, r)
                    # the sweep costs ~3 min a round: the first only, unless --wan-rounds asks for more
                    if r == 0 or a.wan_rounds:
                        failures += sweep_round(clients, link, peers, res, a.clients, r)
                else:
                    failures += fat_round(clients, origin, link, peers, res, r)
        finally:
            for p in peers:
                p.stop_all()
            link.stop()
    return failures


# rustls' names of the TLS 1.3 and 1.2 suites' bulk ciphers, and openssl's
EVP = {"AES_128_GCM": "aes-128-gcm", "AES_256_GCM": "aes-256-gcm", "CHACHA20_POLY1305": "chacha20-poly1305"}


def negotiated(logs):
    """{side: suite} that regproxy logged (`regproxy::tls` at debug) for registry.test, the most
    frequent per side: the pulls' connections, not the leaf-issuance test's Python handshakes."""
    seen = {}
    for path in logs:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.search(r'regproxy::tls.*?side="?(client|upstream)"? host=' + re.escape(HOST) + r' .*?suite=(\w+)',
                              line)
                if m:
                    key = (m.group(1), m.group(2))
                    seen[key] = seen.get(key, 0) + 1
    out = {}
    for (side, suite), n in sorted(seen.items(), key=lambda kv: -kv[1]):
        out.setdefault(side, suite)
    return out


def openssl_rate(alg, decrypt=False):
    """Bytes per CPU-second of `openssl speed -evp ALG` on 16 KiB blocks (a full TLS record);
    openssl divides by its user CPU time, so other load on the machine does not lower it."""
    cmd = ["openssl", "speed", "-mr", "-seconds", "1", "-bytes", "16384"]
    out = run(cmd + (["-decrypt"] if decrypt else []) + ["-evp", alg])
    for line in out.splitlines():
        if line.startswith("+F:"):
            return float(line.rsplit(":", 1)[1])
    raise RuntimeError(f"no rate in the output of {' '.join(cmd)}")


def cpu_floor(suites, reps=3):
    """CPU seconds per GiB the cryptography alone costs: cold, the upstream suite's decryption plus
    the client suite's encryption plus SHA-256; warm, the client suite's encryption."""
    up = suites.get("upstream", "TLS13_AES_256_GCM_SHA384")
    down = suites.get("client", "TLS13_AES_128_GCM_SHA256")
    evp = lambda suite: next(v for k, v in EVP.items() if k in suite)  # noqa: E731
    rate = lambda alg, dec=False: statistics.median(openssl_rate(alg, dec) for _ in range(reps))  # noqa: E731
    dec, enc, sha = rate(evp(up), True), rate(evp(down)), rate("sha256")
    return {"cold": GiB / dec + GiB / enc + GiB / sha, "warm": GiB / enc, "up": up, "down": down,
            "dec": dec, "enc": enc, "sha": sha, "assumed": not suites}


def image_bytes(layout):
    """Bytes of every blob of a generated image (manifest, config, layers): what one pull moves."""
    d = os.path.join(layout, "blobs", "sha256")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def push(origin, clients, layout, image):
    run(["skopeo", "copy", "-q", "--preserve-digests", "--dest-cert-dir", origin.certdir,
         f"oci:{layout}:latest", f"docker://127.0.0.1:{origin.port}/test/{image}:latest"], env=clients.env(None))


def image_layout(cache_root, name, layers, size, seed):
    d = os.path.join(cache_root, f"{name}-{layers}x{size}-seed{seed}")
    if not os.path.exists(os.path.join(d, ".done")):
        shutil.rmtree(d, ignore_errors=True)
        log(f"generating image {name}: {layers} x {size}")
        run([sys.executable, os.path.join(HERE, os.pardir, "tests", "support", "mkimage.py"), d, "--layers", str(layers), "--size", size,
             "--seed", str(seed)])
        open(os.path.join(d, ".done"), "w").close()
    with open(os.path.join(d, "index.json")) as f:
        top = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(d, "blobs", "sha256", top.split(":")[1])) as f:
        m = json.load(f)
    return d, [l["digest"] for l in m["layers"]], m["config"]["digest"]


def ctr_round(ctr, clients, origin, peers, res, cases, failures, r):
    """One round of ctr pulls: cold for every peer, then warm with the origin stopped."""
    cold, warm = cases
    for p in peers:
        try:
            if p.caching:
                p.fresh()
            res.add(cold, p.name, ctr.pull(clients, p, "big"))
            if not p.caching:
                res.add(warm, p.name, res.data[(cold, p.name)][-1])
        except Exception as e:  # noqa: BLE001
            failures.append(f"round {r + 1}, {p.name}, ctr cold: {e}")
            log(failures[-1])
    origin.stop()
    try:
        for p in peers:
            if p.caching:
                try:
                    res.add(warm, p.name, ctr.pull(clients, p, "big"))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"round {r + 1}, {p.name}, ctr warm (origin stopped): {e}")
                    log(failures[-1])
    finally:
        origin.start()


# ---------------------------------------------------------------- leaf issuance

def handshakes(proxy_port, ca, names, target_port=443):
    """Time (s) of the TLS handshake through CONNECT for each name (CONNECT reply excluded)."""
    ctx = ssl.create_default_context(cafile=ca)
    out = []
    for name in names:
        s = socket.create_connection(("127.0.0.1", proxy_port), 30)
        s.sendall(f"CONNECT {name}:{target_port} HTTP/1.1\r\nHost: {name}:{target_port}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"proxy closed CONNECT {name}")
            buf += chunk
        if b" 200" not in buf.split(b"\r\n")[0]:
            raise RuntimeError(f"CONNECT {name}: {buf.splitlines()[0]!r}")
        t0 = time.perf_counter()
        t = ctx.wrap_socket(s, server_hostname=name)
        out.append(time.perf_counter() - t0)
        t.close()
    return out


def leaf_issuance(peer, n, tag):
    """Median handshake for a never-seen name minus median for a cached name, in ms."""
    handshakes(peer.port, peer.ca, [f"warm{i}-{tag}.bench.test" for i in range(20)] + [f"h0-{tag}.bench.test"])
    # Interleaved, a new name then the cached one, so that the machine's drift over the run (which
    # made the cached name the slower one when each went in a block of its own) touches both alike.
    names = [name for i in range(1, n + 1) for name in (f"h{i}-{tag}.bench.test", f"h0-{tag}.bench.test")]
    times = handshakes(peer.port, peer.ca, names)
    fresh, same = times[0::2], times[1::2]
    return (statistics.median(fresh) - statistics.median(same)) * 1000, statistics.median(fresh) * 1000, \
        statistics.median(same) * 1000


# ---------------------------------------------------------------- report

def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    osname = "?"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"
    return {
        "CPU": f"{cpu}, {os.cpu_count()} CPUs (nproc {ver(['nproc'])})",
        "Memory": f"{mem:.1f} GiB",
        "OS / kernel": f"{osname}, Linux {platform.release()}",
        "skopeo": ver(["skopeo", "--version"]),
        "docker-registry": ver(["docker-registry", "--version"]),
        "nginx": ver(["nginx", "-v"]),
        "curl": ver(["curl", "--version"]),
    }


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.3f} ms"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    if unit == "MiB/s":
        return f"{v:.0f} MiB/s"
    if unit == "x":
        return f"{v:.2f}"
    return f"{v:g}"


class Results:
    def __init__(self):
        self.data = {}     # (case, peer) -> [values]
        self.cases = []    # (case, unit, note)
        self.notes = []
        self.fleet = None  # the fleet section's figures (fleet_section), or why it has none
        self.profiles = None  # the profile section's markdown (profile_section), or why it has none

    def case(self, case, unit, note=""):
        if case not in [c[0] for c in self.cases]:
            self.cases.append((case, unit, note))

    def add(self, case, peer, v):
        self.data.setdefault((case, peer), []).append(v)

    def med(self, case, peer):
        vs = self.data.get((case, peer))
        return statistics.median(vs) if vs else None

    def table(self, peers, only=None, skip=()):
        lines = []
        for case, unit, note in self.cases:
            if (only is not None and case not in only) or case in skip:
                continue
            if not any(self.data.get((case, p)) for p in peers):
                continue
            lines += [f"### {case}", ""]
            if note:
                lines += [note, ""]
            lines += ["| peer | median | min | max | runs | ÷ direct | ÷ tunnel |", "|---|---:|---:|---:|---:|---:|---:|"]
            d, t = self.med(case, "direct"), self.med(case, "tunnel")
            for p in peers:
                vs = self.data.get((case, p))
                if not vs:
                    continue
                m = statistics.median(vs)
                rd = fmt(m / d, "x") if d and unit not in ("n", "ms") else "—"
                rt = fmt(m / t, "x") if t and unit not in ("n", "ms") else "—"
                lines.append(f"| {p} | {fmt(m, unit)} | {fmt(min(vs), unit)} | {fmt(max(vs), unit)} | {len(vs)} | {rd} | {rt} |")
            lines.append("")
        return lines


def load_note(label):
    """The 1-minute load average as a round starts: the bench's own previous round still counts in it."""
    return (f"{label}: load average {os.getloadavg()[0]:.1f} at its start (a 1-minute mean: it includes the "
            f"bench's own work just before, as well as any other work on the machine)")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regproxy", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                       "release", "regproxy"))
    ap.add_argument("--mitmdump", default=shutil.which("mitmdump") or os.path.join(HERE, ".venv", "bin", "mitmdump"))
    ap.add_argument("--quick", action="store_true", help="one round, 256 MiB instead of 1 GiB: a smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--image-cache", default="/tmp/regproxy-bench-images",
                    help="generated images are kept here between runs")
    ap.add_argument("--peers", default="direct,tunnel,regproxy,distribution,nginx,mitmproxy")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for debugging")
    ap.add_argument("--regproxy-args", default="", help="more flags for regproxy, e.g. \"--blob-connections 1\"")
    ap.add_argument("--sections", default="loopback,small,wan,fleet,cpuprofile",
                    help="loopback: the cases over loopback; small: small requests, regproxy against nginx; "
                         "wan: the WAN profiles; fleet: bench/fleet.py; cpuprofile: bench/cpuprofile.py, where "
                         "the CPU goes (comma list)")
    ap.add_argument("--profiles", default="uplink,fat", help="WAN profiles to run (comma list)")
    ap.add_argument("--wan-rounds", type=int, default=None, help="rounds of the WAN profiles (default 2, 1 with --quick)")
    ap.add_argument("--clients", default="1,2,4,8", type=lambda v: [int(n) for n in v.split(",") if n],
                    help="the site uplink's concurrency sweep: counts of concurrent clients (empty: no sweep); "
                         "in the first WAN round, or in each when --wan-rounds is given")
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    wan_rounds = a.wan_rounds or (1 if a.quick else 2)
    sections = a.sections.split(",")
    huge_size = "256MiB" if a.quick else "1GiB"
    huge_label = "256 MiB" if a.quick else "1 GiB"
    want = a.peers.split(",")
    for k in list(os.environ):
        if "proxy" in k.lower():
            del os.environ[k]

    def on_signal(sig, _):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)

    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="regproxy-bench-")
    res = Results()
    peers = []
    ctr = None
    origin = None
    failures = []
    try:
        os.makedirs(a.image_cache, exist_ok=True)
        big = image_layout(a.image_cache, "big", 1, "200MiB", 1)
        many = image_layout(a.image_cache, "many", 100, "64KiB", 2)
        huge = image_layout(a.image_cache, "huge", 1, huge_size, 3)
        images = {"big": big, "many": many, "huge": huge}
        if "wan" in sections:
            images["fat1"] = image_layout(a.image_cache, "fat1", 1, "64MiB", 4)
            images["fat8"] = image_layout(a.image_cache, "fat8", 8, "4MiB", 5)
        size_of = {name: image_bytes(layout) for name, (layout, _, _) in images.items()}
        log(f"work dir {work}")
        origin = Origin(work)
        origin.start()
        clients = Clients(work)
        for name, (layout, _, _) in images.items():
            push(origin, clients, layout, name)
        log("images pushed")

        peers = make_peers(a, work, origin, res)
        for p in peers:
            if "loopback" in sections:
                p.start()
        names = [p.name for p in peers]
        by = {p.name: p for p in peers}
        caching = [p for p in peers if p.caching]

        C_BIG, C_BIGW = "Pull 1 × 200 MiB, cold", "Pull 1 × 200 MiB, warm, origin stopped"
        C_MANY, C_MANYW = "Pull 100 × 64 KiB, cold", "Pull 100 × 64 KiB, warm, origin stopped"
        C_CONC, C_CONCR = f"{CONC} concurrent cold pulls of 1 × 200 MiB (wall time)", f"{CONC} concurrent cold pulls ÷ one cold pull (same peer)"
        C_GETS = f"Times a blob crossed from the origin during the {CONC} concurrent pulls of 1 × 200 MiB"
        C_RSS200 = f"Peak RSS of the proxy, {CONC} concurrent cold pulls of 1 × 200 MiB"
        C_RSSH = f"Peak RSS of the proxy, {CONC} concurrent cold pulls of 1 × {huge_label}"
        C_TP = f"Throughput of one connection, GET of the {huge_label} blob, warm"
        C_LEAF = "Leaf issuance: TLS handshake, new host name minus cached name"
        C_CTR, C_CTRW = "ctr: fetch 1 × 200 MiB, cold", "ctr: fetch 1 × 200 MiB, warm, origin stopped"
        NCPU = os.cpu_count() or 1
        C_CPUP, C_CPUC = "CPU time of the proxy, one cold pull of 1 × 200 MiB", "CPU time of the client (skopeo), one cold pull of 1 × 200 MiB"
        C_CPUA = f"CPU time of client + origin + proxy ÷ {NCPU} CPUs, one cold pull of 1 × 200 MiB"
        C_CPU8C = f"CPU time of the {CONC} clients (skopeo), {CONC} concurrent cold pulls of 1 × 200 MiB"
        C_CPU8A = f"CPU time of clients + origin + proxy ÷ {NCPU} CPUs, {CONC} concurrent cold pulls of 1 × 200 MiB"

        def accounted(p, image, n=1, cases=(), per_gib=None):
            """Wall time of the pull(s); CPU seconds of client, proxy, and all ÷ CPUs go to `cases`,
            the TLS processes' CPU seconds per GiB pulled to `per_gib`."""
            wall, cpu = measured(clients, origin, p, [image] * n)
            c, o, q = cpu["client"], cpu["origin"], cpu["proxy"]
            for case, v in zip(cases, (c, q, (c + o + q) / NCPU)):
                if case:
                    res.add(case, p.name, v)
            if per_gib and p.terminates_tls:
                res.add(per_gib, p.name, cpu["tls"] / (n * size_of[image] / GiB))
            return wall

        if "loopback" not in sections:
            pass
        elif shutil.which("containerd") and shutil.which("ctr"):
            ctr = Ctr(work)
            ctr.start()
        else:
            res.notes.append("ctr: containerd not installed, ctr cases skipped.")

        res.case(W_COLD, "s")
        res.case(W_WARM, "s", "direct and tunnel: their cold pull (their only mode); caching peers: a second pull, "
                              "the origin up behind the link.")
        res.case(W_CONC, "s")
        res.case(W_CONCR, "x", "The goal's ratio: the caching peer's 8 pulls against one direct pull of the same round "
                               "(direct: its own 8 pulls in the concurrency sweep).")
        res.case(W_LINK, "MiB", "Bytes from the origin that crossed the link (relay counters) during the 8 pulls; the image "
                                "is 200 MiB (direct: its 8 pulls in the concurrency sweep).")
        res.case(W_CPU1, "s", "utime + stime of the skopeo client, the origin, the peer's processes and bench/wan.py, ÷ CPUs: "
                              "the shortest wall time this machine's CPUs allow the pull, were they idle otherwise.")
        res.case(W_CPU8, "s", "The same for the 8 concurrent pulls: compare with their wall time above.")
        res.case(W_CLI8, "s", "The part of it that the skopeo clients used (each hashes every blob twice, and writes it).")
        res.case(W_TAIL1, "s", "From the last change of the relay's byte counter (100 ms ticks) to the end of the pull: "
                               "what the client, and the proxy before its last byte, do once the link is done.")
        res.case(W_TAIL8, "s", "The same for the 8 concurrent pulls: each skopeo flushes its 200 MiB to disk at the end.")
        res.case(W_PAUSE1, "s", "The longest time the relay's count of bytes from the origin moved less than 64 KiB, "
                 "between the first and the last of them, less one 100 ms counter tick: a link that stands still "
                 "while a pull waits on something else (each new connection's round trip, a piece's request, "
                 "a stalled reader upstream of the cache).")
        res.case(W_PAUSE8, "s", "The same for the 8 concurrent pulls: where a slow round lost its time, if on the link.")
        res.case(F_COLD, "s")
        res.case(F_CONNS, "n", "Connections the relay accepted during the two pulls (clients' for direct; the "
                               "proxy's upstream connections otherwise).")
        res.case(C_BIG, "s")
        res.case(C_BIGW, "s", "direct and tunnel: with the origin up (their only mode); caching peers: origin stopped.")
        res.case(C_MANY, "s")
        res.case(C_MANYW, "s", "direct and tunnel: with the origin up; caching peers: origin stopped.")
        res.case(C_CTR, "s", "`ctr content fetch` into a private containerd (a new namespace per pull, content not "
                             "shared between namespaces): containerd's resolver and fetcher, as Kubernetes nodes pull.")
        res.case(C_CTRW, "s", "direct and tunnel: with the origin up; caching peers: origin stopped.")
        res.case(C_CONC, "s")
        res.case(C_CONCR, "x")
        res.case(C_GETS, "x", "Bytes of the blob's 2xx GETs (whole or ranged) in the origin's access log ÷ its size; "
                              "the most of any blob of the image (config blob included).")
        res.case(C_RSS200, "MiB", "VmHWM of a freshly started proxy after the pulls (nginx: master + workers summed; "
                                  "distribution: the mirror registry; tunnel: the Python tunnel).")
        res.case(C_RSSH, "MiB", "regproxy only (fresh process).")
        res.case(C_TP, "MiB/s", "curl -o /dev/null, one connection, cache warm (non-caching peers: pass-through); higher is better.")
        res.case(C_CPUP, "s", "utime + stime of the proxy's processes (nginx: master, workers and its CONNECT front; "
                              "distribution: the mirror registry) over the pull; direct has none.")
        res.case(C_CPUC, "s", "utime + stime of the skopeo process.")
        res.case(C_CPUA, "s", "The shortest wall time the machine's CPUs allow for the pull; compare with the wall "
                              "times above.")
        res.case(C_CPU8C, "s")
        res.case(C_CPU8A, "s")
        small_seconds = 2 if a.quick else 5
        small.register(res, small_seconds)
        res.case(C_LEAF, "ms", f"Median of 200 handshakes through CONNECT to `hN.bench.test:443` (never seen before) minus the median of 200 "
                               f"to one already-seen name; Python ssl client, P-256 leaf. nginx serves one static leaf (n/a).")

        for r in range(rounds if "loopback" in sections else 0):
            log(f"round {r + 1}/{rounds}")
            res.notes.append(load_note(f"Loopback, round {r + 1}"))
            for p in caching:
                p.fresh()
            # cold pulls, peers interleaved
            for p in peers:
                try:
                    res.add(C_BIG, p.name, accounted(p, "big", cases=(C_CPUC, C_CPUP, C_CPUA), per_gib=G_LC))
                    res.add(C_MANY, p.name, clients.pull(p, "many"))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"round {r + 1}, {p.name}, cold: {e}")
                    log(failures[-1])
            if "nginx" in by:
                log(f"nginx blob cache statuses after cold: {by['nginx'].cache_statuses()}")
            for n in ("direct", "tunnel"):
                for c, cw in ((C_BIG, C_BIGW), (C_MANY, C_MANYW)):
                    if (c, n) in res.data:
                        res.add(cw, n, res.data[(c, n)][-1])
            # warm with the origin stopped
            origin.stop()
            try:
                for p in caching:
                    for img, case in (("big", C_BIGW), ("many", C_MANYW)):
                        try:
                            res.add(case, p.name, accounted(p, img, per_gib=G_LW if img == "big" else None))
                        except Exception as e:  # noqa: BLE001
                            failures.append(f"round {r + 1}, {p.name}, warm {img} (origin stopped): {e}")
                            log(failures[-1])
            finally:
                origin.start()
            if "nginx" in by:
                log(f"nginx blob cache statuses after warm: {by['nginx'].cache_statuses()}")
            if ctr:
                ctr_round(ctr, clients, origin, peers, res, (C_CTR, C_CTRW), failures, r)
            # concurrent cold pulls
            for p in peers:
                if p.caching:
                    p.fresh()
                elif p.rss_pid():  # non-caching proxies: a fresh process too, for a fair peak RSS
                    p.stop()
                    p.start()
                off = origin.log_size()
                try:
                    wall = accounted(p, "big", CONC, cases=(C_CPU8C, None, C_CPU8A))
                    res.add(C_CONC, p.name, wall)
                    one = res.data.get((C_BIG, p.name), [None])[-1]
                    if one:
                        res.add(C_CONCR, p.name, wall / one)
                    carried = origin.blob_carried(off, big[0])
                    res.add(C_GETS, p.name, round(max([0] + list(carried.values())), 3))
                    if p.rss_pid():
                        res.add(C_RSS200, p.name, tree_hwm_mib(p.rss_pid()))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"round {r + 1}, {p.name}, {CONC} concurrent: {e}")
                    log(failures[-1])
            # regproxy: the big blob for peak RSS, then its warm cache for throughput
            if "regproxy" in by:
                rp = by["regproxy"]
                rp.fresh()
                off = origin.log_size()
                try:
                    clients.pull(rp, "huge", CONC)
                    res.add(C_RSSH, "regproxy", tree_hwm_mib(rp.rss_pid()))
                    carried = origin.blob_carried(off, huge[0])
                    if abs(carried.get(huge[1][0], 0) - 1) > 0.01:
                        res.notes.append(f"round {r + 1}: regproxy, {CONC} × {huge_label}: blobs carried {carried}")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"round {r + 1}, regproxy, {CONC} concurrent {huge_label}: {e}")
                    log(failures[-1])
            # throughput of one warm connection
            for p in peers:
                if p.caching and p.name != "regproxy":
                    p.fresh()
                try:
                    args = p.curl_args("huge", huge[1][0])
                    if p.caching and p.name != "regproxy":
                        clients.curl_mibps(args)  # fills the cache
                    mibps, size = clients.curl_mibps(args)
                    res.add(C_TP, p.name, mibps)
                except Exception as e:  # noqa: BLE001
                    failures.append(f"round {r + 1}, {p.name}, throughput: {e}")
                    log(failures[-1])
            # leaf issuance
            for n in ("regproxy", "mitmproxy"):
                if n in by:
                    try:
                        diff, fresh, same = leaf_issuance(by[n], 200, f"r{r}")
                        res.add(C_LEAF, n, diff)
                        res.notes.append(f"round {r + 1}: {n} handshake medians: new name {fresh:.3f} ms, "
                                         f"cached name {same:.3f} ms")
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"round {r + 1}, {n}, leaf issuance: {e}")
                        log(failures[-1])
            log(f"round {r + 1} done at {time.monotonic() - started:.0f} s")

        metrics = ""
        if "regproxy" in by and "loopback" in sections:
            try:
                metrics = "\n".join(l for l in by["regproxy"].metrics().splitlines()
                                    if l.startswith("regproxy_") and not l.endswith(" 0"))
            except Exception:  # noqa: BLE001
                pass
        if "small" in sections:
            failures += small.phase(a.regproxy, peers, big[0], res, rounds, small_seconds, log, cpu_s)
        for p in peers:
            p.stop_all()
        if "wan" in sections:
            failures += wan_phase(a, work, origin, clients, res, wan_rounds, size_of["big"])
        if "fleet" in sections:
            failures += fleet_section(a, res)
        if "cpuprofile" in sections:
            failures += profile_section(a, res)
        suites = negotiated([os.path.join(work, f) for f in os.listdir(work) if re.match(r"regproxy.*\.log$", f)])
        log(f"negotiated suites {suites}; measuring the floor with openssl speed")
        floor = cpu_floor(suites)
        elapsed = time.monotonic() - started
        write_report(a, res, names, (rounds, wan_rounds, sections), huge_label, elapsed, failures, metrics, floor,
                     {"C_BIG": C_BIG, "C_BIGW": C_BIGW, "C_MANY": C_MANY, "C_CONC": C_CONC, "C_CONCR": C_CONCR,
                      "C_GETS": C_GETS, "C_RSS200": C_RSS200, "C_RSSH": C_RSSH, "C_LEAF": C_LEAF,
                      "C_CPUP": C_CPUP, "C_CPUC": C_CPUC, "C_CPUA": C_CPUA, "C_CPU8C": C_CPU8C, "C_CPU8A": C_CPU8A})
        log(f"wrote {a.out} after {elapsed:.0f} s")
    finally:
        if ctr:
            ctr.stop()
        for p in peers:
            try:
                p.stop_all()
            except Exception:  # noqa: BLE001
                pass
        if origin:
            origin.stop()
        for p in PROCS:
            kill(p, timeout=5)
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def spread(vs, unit):
    """`median (min–max, n)` of the rounds' values."""
    if not vs:
        return "n/a"
    if len(vs) == 1:
        return fmt(vs[0], unit)
    return f"{fmt(statistics.median(vs), unit)} ({fmt(min(vs), unit)}–{fmt(max(vs), unit)})"


def wan_cpu_goals(res, floor, goal):
    """The WAN and CPU goals, in the order of the issue that set them."""
    def ratio(case, peer, by_case, by_peer="direct"):
        x, y = res.med(case, peer), res.med(by_case, by_peer)
        return x / y if x is not None and y else None
    v = ratio(W_COLD, "regproxy", W_COLD)
    goal("site uplink: cold pull, regproxy ÷ direct ≤ 1.05", v, v is not None and v <= 1.05, fmt(v, "x"))
    v = ratio(W_WARM, "regproxy", W_COLD)
    goal("site uplink: warm pull, regproxy ÷ direct ≤ 0.2", v, v is not None and v <= 0.2, fmt(v, "x"))
    v = ratio(W_CONC, "regproxy", W_COLD)
    goal(f"site uplink: {CONC} concurrent cold pulls through regproxy ÷ one direct pull ≤ 1.3", v,
         v is not None and v <= 1.3, fmt(v, "x"))
    v = res.med(W_LINK, "regproxy")
    goal(f"site uplink: the {CONC} pulls carry the 200 MiB image across the link once (≤ 210 MiB)", v,
         v is not None and v <= 210, fmt(v, "MiB"))
    v = ratio(F_COLD, "regproxy", F_COLD)
    goal("long fat path: two clients at once, cold, regproxy ÷ direct ≤ 0.6", v, v is not None and v <= 0.6,
         fmt(v, "x"))
    for case in CPU_CASES:
        v = res.med(case, "regproxy")
        v = v / floor[CPU_KIND[case]] if v is not None else None
        goal(f"CPU per GiB, {case}: regproxy ÷ floor ≤ 1.5", v, v is not None and v <= 1.5, fmt(v, "x"))
    for case in (G_LC, G_LW):
        mine = res.med(case, "regproxy")
        others = {p: res.med(c, p) for (c, p) in res.data if c == case and p != "regproxy"}
        least = mine is not None and all(mine <= v for v in others.values())
        shown = ", ".join(f"{p} {fmt(v, 'x')}" for p, v in sorted(others.items()))
        goal(f"CPU per GiB, {case}: regproxy the least of the TLS-terminating peers", mine, least,
             f"regproxy {fmt(mine, 'x')}; {shown or 'no other peer'} (CPU-s/GiB)")


def wan_why(res):
    """What bounds the site uplink's CPU-heavy cases, from the CPU accounting of the same pulls."""
    out = []
    c8, w8 = res.med(W_CPU8, "regproxy"), res.med(W_CONC, "regproxy")
    c1, w1 = res.med(W_CPU1, "direct"), res.med(W_COLD, "direct")
    if None not in (c8, w8, c1, w1):
        out.append(f"- Site uplink, {CONC} concurrent cold pulls through regproxy: all processes' CPU ÷ CPUs "
                   f"{fmt(c8, 's')} against a wall time of {fmt(w8, 's')}; for one direct pull {fmt(c1, 's')} against "
                   f"{fmt(w1, 's')}. The {CONC} skopeo clients need most of it; with other work on the machine (load "
                   f"average in the notes) the pulls wait for CPU, not for the link.")
    k8, t8, t1 = res.med(W_CLI8, "regproxy"), res.med(W_TAIL8, "regproxy"), res.med(W_TAIL1, "direct")
    if None not in (k8, t8, t1, w8):
        out.append(f"- Of that, the {CONC} skopeo clients alone: {fmt(k8, 's')} ÷ CPUs. The pulls end "
                   f"{fmt(t8, 's')} after the last byte crossed the link (one direct pull: {fmt(t1, 's')}): each "
                   f"client flushes its 200 MiB to disk (fsync) when its blob is in, {CONC} × 200 MiB at once; "
                   f"regproxy's own copy is written back as it arrives. The last byte crossed the link "
                   f"{fmt(w8 - t8, 's')} after the start, against {fmt(w1 - t1, 's')} for one direct pull.")
    pauses = res.data.get((W_PAUSE8, "regproxy"))
    if pauses:
        out.append(f"- The link's longest pause mid-transfer during the {CONC} pulls through regproxy, per round: "
                   f"{', '.join(fmt(v, 's') for v in pauses)} (one direct pull: "
                   f"{fmt(res.med(W_PAUSE1, 'direct'), 's')}): a slow round that paused the link lost its time "
                   f"there, one that did not lost it elsewhere.")
    cw, ww = res.med(W_CPU1, "regproxy"), res.med(W_WARM, "regproxy")
    if None not in (cw, ww):
        out.append(f"- Site uplink, cold pull through regproxy: all processes' CPU ÷ CPUs {fmt(cw, 's')} "
                   f"(wall {fmt(res.med(W_COLD, 'regproxy'), 's')}); a warm pull moves the same 200 MiB through skopeo "
                   f"at local speed, so its wall time ({fmt(ww, 's')}) is CPU time.")
    # The warm goal's floor: no cache can hand skopeo the image faster than skopeo takes it from
    # a registry on the same machine.
    lo, lw, wd = res.med("Pull 1 × 200 MiB, cold", "direct"), res.med("Pull 1 × 200 MiB, warm, origin stopped",
                                                                   "regproxy"), res.med(W_COLD, "direct")
    if None not in (lo, lw, wd, ww):
        out.append(f"- Site uplink, warm: skopeo pulling the same image straight from the origin over loopback (no "
                   f"link, no proxy; the loopback table) takes {fmt(lo, 's')}, {lo / wd:.2f} of the uplink's direct "
                   f"pull: the floor for any cache on this machine, against the goal's 0.2. regproxy's warm pull "
                   f"takes {fmt(lw, 's')} over loopback and {fmt(ww, 's')} ({ww / wd:.2f}) on the uplink.")
    return out


def cpu_table(res, names, floor):
    """CPU seconds per GiB of each TLS-terminating peer, and ÷ the floor, per case."""
    head = "| peer | " + " | ".join(f"{c} | ÷ floor" for c in CPU_CASES) + " |"
    L = [head, "|---|" + "---:|---:|" * len(CPU_CASES)]
    row = "| floor | " + " | ".join(f"{floor[CPU_KIND[c]]:.2f} | 1.00" for c in CPU_CASES) + " |"
    L.append(row)
    for p in names:
        cells = []
        for c in CPU_CASES:
            vs = res.data.get((c, p))
            r = fmt(statistics.median(vs) / floor[CPU_KIND[c]], "x") if vs else "—"
            cells.append(f"{spread(vs, 'x') if vs else '—'} | {r}")
        if any(res.data.get((c, p)) for c in CPU_CASES):
            L.append(f"| {p} | " + " | ".join(cells) + " |")
    return L


def profile_section(a, res):
    """bench/cpuprofile.py for regproxy and nginx, cold and warm: what bounds their CPU per GiB."""
    if not shutil.which("perf"):
        res.profiles = "perf is not installed (Debian: linux-perf)"
        return []
    import cpuprofile  # it imports this module: not at the top
    res.profiles, failures = [], []
    for peer in ("regproxy", "nginx"):
        for case in ("cold", "warm"):
            args = argparse.Namespace(regproxy=a.regproxy, mitmdump=a.mitmdump, peer=peer, case=case, freq=1999,
                                      image_cache=a.image_cache, data=None)
            log(f"profile: {peer}, {case}")
            try:
                res.profiles += cpuprofile.report(args)
            except Exception as e:  # noqa: BLE001
                failures.append(f"profile of {peer}, {case}: {e}")
    return failures


def profile_lines(profiles):
    """The profile section of the report: where the CPU goes, or why it was not profiled."""
    if profiles is None:
        return []
    L = ["", "### What bounds the CPU per GiB", ""]
    if isinstance(profiles, str):
        return L + [f"Not profiled: {profiles}.", ""]
    return L + ["`bench/cpuprofile.py`: `perf record --call-graph dwarf` of the peer's TLS processes over one more pull "
                "of `big` (loopback; warm with the origin stopped), each sample put in one category by its call "
                "chain. perf itself adds CPU, so the totals run above the table above; the shares are what count. "
                "With no kTLS on this kernel (its `tcp_available_ulp` lacks `tls`), every byte a proxy serves is "
                "read from the page cache into user space, encrypted there and copied into a socket: the kernel rows "
                "and the copies sit above the cryptographic floor for every peer.", ""] + profiles


def fleet_section(a, res):
    """bench/fleet.py's two fleets with its default sizes; `res.fleet` gets their figures, or why there
    are none. Returns failures."""
    res.fleet = fleet.garage_missing()
    if res.fleet:
        log(f"fleet: skipped, {res.fleet}")
        return []
    args = fleet.parser().parse_args(["--regproxy", a.regproxy])
    log(f"fleet: {args.pulls} pulls over {args.nodes} nodes, alone then sharing a store")
    try:
        res.fleet = (args,) + fleet.measure(args)
    except Exception as e:  # noqa: BLE001
        res.fleet = "it failed (see Failures)"
        return [f"fleet: {e}"]
    return []


def fleet_lines(result):
    """The fleet section of the report: fleet.py's table, or why it was skipped."""
    if result is None:
        return []
    L = ["", "## The fleet case: one uplink for many nodes", ""]
    if isinstance(result, str):
        return L + [f"Skipped: {result}."]
    args, image_bytes, rows = result
    L += [f"`bench/fleet.py` (its defaults): {args.pulls} concurrent cold pulls of one image ({args.layers} × "
          f"{args.size}, {image_bytes} bytes) spread over {args.nodes} regproxy nodes, twice: each node alone with "
          "its own disk, then the nodes sharing one bucket (Garage on loopback, `scripts/garage.sh`) and knowing "
          "each other (`--peer`, fleet-wide single flight). Origin bytes are the sizes of the origin's 2xx GETs of "
          "blobs and manifests in its access log: what a site's uplink would carry. They include what the origin "
          "wrote into a connection before a client closed it (a whole answer cut short counts what the socket "
          "buffers took; regproxy asks every blob in ranged pieces, the first request too, so it cuts none). "
          "The origin is on loopback, not behind a WAN link, so the wall times say little.", ""]
    return L + fleet.table(image_bytes, rows)


def draw_plots(a, res, names, floor):
    """PNGs next to the report, as the Markdown that shows each (or says why it is missing):
    {"sweep": …, "cpu": …}, a key only where there is something to plot."""
    d = os.path.dirname(os.path.abspath(a.out))
    stem = os.path.splitext(os.path.basename(a.out))[0]
    prefix = "" if stem == "RESULTS" else f"{stem}-"
    out = {}

    def place(key, name, alt, why):
        out[key] = f"Plot `{name}`: {why}." if why else f"![{alt}]({name})"

    series = {p: [(n, res.data.get((sweep_case(n), p))) for n in a.clients] for p in ("direct", "regproxy")}
    if any(vs for pts in series.values() for _, vs in pts):
        name = f"{prefix}concurrency.png"
        place("sweep", name, "Site uplink: pull time against concurrent clients",
              plots.concurrency(os.path.join(d, name), series,
                                "Site uplink (200 Mbit/s, 20 ms): cold pulls of 1 × 200 MiB"))
    peers = {p: {c: res.med(c, p) for c in CPU_CASES if res.med(c, p) is not None} for p in names}
    cases = [c for c in CPU_CASES if any(c in v for v in peers.values())]
    if cases:
        name = f"{prefix}cpu.png"
        place("cpu", name, "CPU per GiB against the floor",
              plots.cpu_per_gib(os.path.join(d, name), cases, {c: floor[CPU_KIND[c]] for c in cases},
                                peers, "CPU per GiB pulled, TLS-terminating peers, against the floor"))
    return out


def write_report(a, res, names, rounds, huge_label, elapsed, failures, metrics, floor, C):
    def m(case, peer):
        return res.med(C[case], peer)

    def ratio(x, y):
        return x / y if x is not None and y else None

    goals = []
    def goal(text, value, ok, shown):
        goals.append(f"| {text} | {shown} | {'PASS' if ok else ('FAIL' if value is not None else 'n/a')} |")

    wan_cpu_goals(res, floor, goal)
    if isinstance(res.fleet, tuple):
        for g in fleet.goals(*res.fleet):
            goal(*g)
    top, goals = goals, []
    v = ratio(m("C_BIG", "regproxy"), m("C_BIG", "tunnel"))
    goal("cold 200 MiB, regproxy ÷ tunnel ≤ 1.05", v, v is not None and v <= 1.05, fmt(v, "x"))
    v = ratio(m("C_BIGW", "regproxy"), m("C_BIG", "direct"))
    goal("warm 200 MiB (origin stopped), regproxy ÷ direct ≤ 0.9", v, v is not None and v <= 0.9, fmt(v, "x"))
    v = ratio(m("C_MANY", "regproxy"), m("C_MANY", "tunnel"))
    goal("cold 100 × 64 KiB, regproxy ÷ tunnel ≤ 1.10", v, v is not None and v <= 1.10, fmt(v, "x"))
    gets = res.data.get((C["C_GETS"], "regproxy"))
    goal(f"{CONC} concurrent cold pulls: every blob crosses from the origin once, ≤ 1.01 × its size (every round)",
         gets, bool(gets) and all(g <= 1.01 for g in gets), ", ".join(f"{g:.3f}" for g in gets) if gets else "n/a")
    v = m("C_CONCR", "regproxy")
    goal(f"{CONC} concurrent cold pulls wall ÷ one pull ≤ 1.3 (regproxy)", v, v is not None and v <= 1.3, fmt(v, "x"))
    h, s = res.data.get((C["C_RSSH"], "regproxy")), m("C_RSS200", "regproxy")
    hv = max(h) if h else None
    flat = hv is not None and s is not None and hv <= s * 1.25 + 4
    goal(f"peak RSS, {CONC} clients × {huge_label} blob ≤ 64 MiB and flat in blob size "
         f"(≤ 1.25 × the 200 MiB figure + 4 MiB)", hv, hv is not None and hv <= 64 and flat,
         f"{fmt(hv, 'MiB')} (200 MiB: {fmt(s, 'MiB')})")
    v = m("C_LEAF", "regproxy")
    goal("leaf issuance after warm-up < 1 ms", v, v is not None and v < 1, fmt(v, "ms"))
    small.goals(res, goal)

    why = []
    if m("C_CPUP", "regproxy") is not None and m("C_CPUP", "tunnel") is not None:
        why.append(f"- Cold 200 MiB: regproxy used {fmt(m('C_CPUP', 'regproxy'), 's')} of CPU (decrypt, SHA-256, "
                   f"disk, encrypt), the blind tunnel {fmt(m('C_CPUP', 'tunnel'), 's')}, skopeo itself "
                   f"{fmt(m('C_CPUC', 'regproxy'), 's')}. All processes' CPU ÷ CPUs: "
                   f"{fmt(m('C_CPUA', 'regproxy'), 's')} through regproxy, {fmt(m('C_CPUA', 'tunnel'), 's')} through "
                   f"the tunnel (wall {fmt(m('C_BIG', 'regproxy'), 's')} and {fmt(m('C_BIG', 'tunnel'), 's')}).")
    if m("C_CPU8C", "regproxy") is not None:
        why.append(f"- {CONC} concurrent cold pulls: the {CONC} skopeo clients alone used "
                   f"{fmt(m('C_CPU8C', 'regproxy'), 's')} of CPU, against {fmt(m('C_CPUC', 'regproxy'), 's')} for one "
                   f"pull; all processes ÷ CPUs {fmt(m('C_CPU8A', 'regproxy'), 's')}, so wall ÷ one pull cannot fall "
                   f"near 1.3 on this machine whatever the proxy does (direct: {fmt(m('C_CONCR', 'direct'), 'x')}).")

    try:
        commit = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%H %s"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    mach = machine()
    mach["mitmproxy"] = "?"
    try:
        mach["mitmproxy"] = subprocess.run([a.mitmdump, "--version"], capture_output=True, text=True,
                                           timeout=30).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    rounds, wan_rounds, sections = rounds
    args = " ".join(sys.argv[1:])
    args = re.sub(r"--(regproxy|mitmdump) \S+ ?", "", args).strip()
    L = ["# regproxy benchmark results", "",
         f"Generated by `bench/run{' ' + args if args else ''}` on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: "
         f"sections {', '.join(sections)}; {rounds if 'loopback' in sections else 0} loopback round(s), "
         f"{wan_rounds if 'wan' in sections else 0} WAN round(s); "
         f"{elapsed / 60:.1f} min in all. regproxy commit `{commit}`"
         f"{' (with uncommitted changes in src/)' if dirty else ''}.", "",
         "Ratios are of medians of the same run: absolute times on this shared 2-core machine are noise, ratios "
         "against a peer measured minutes apart much less so. Cells give median (min–max) of the rounds.", "",
         "## Goals: WAN, CPU and the fleet", "", "| goal | measured | result |", "|---|---|---|"] + top
    why_wan = wan_why(res)
    if why_wan:
        L += ["", "Where the time goes (CPU accounting of the same pulls):", ""] + why_wan
    L += ["", "## WAN profiles", "",
          "`bench/wan.py`, a TCP relay on loopback, stands between every peer and the origin (direct clients "
          "connect to it instead of the origin; the tunnel, regproxy, nginx, mitmproxy and distribution connect "
          "upstream through it), so that they all share one link. Each profile starts its own instance of every "
          "peer (fresh caches) behind its link.", "",
          f"- **{UPLINK[1]}**: {UPLINK[3]} Mbit/s per direction shared by all connections, {UPLINK[2]} ms each "
          "way (and one round trip before a new connection's first byte). Image `big` (1 × 200 MiB). Warm: "
          "with the origin up, as users pull. Concurrent: the 8 pulls start together on a fresh cache.",
          f"- **{FAT[1]}**: {FAT[2]} ms each way, {FAT[4]} Mbit/s per TCP connection, {FAT[3]} Mbit/s in all. "
          "Images `fat1` (1 × 64 MiB) and `fat8` (8 × 4 MiB), pulled by two skopeo clients started together "
          "(one image each); wall time until both finished.",
          "- The relay holds at most 8 MiB per connection and direction in flight (a TCP window), so a reader that "
          "stops reading stops its sender.",
          "- The link's sending side is a clock: when the relay wakes late because the machine's CPUs are busy, a "
          "link busy up to 20 ms before goes on from where its clock stands, as a real link sends its queue "
          "meanwhile (a token bucket with 5 ms of burst lost up to 2 s of link time per 10 s transfer under the "
          "8 concurrent clients).",
          "- The relay raises its CPU priority to nice −10 where it may (the notes give what it ran at): a real link "
          "carries bytes however busy the hosts at its ends are. At nice 0 the 8 concurrent clients of the site "
          "uplink still delayed the link's last byte by about 1.1 s (8 pulls ÷ one direct pull 1.32, against 1.22 "
          "at nice −10, 2 rounds each, 2026-12-02).", ""]
    L += res.table(names, only=WAN_CASES)
    figs = draw_plots(a, res, names, floor)
    if "sweep" in figs:
        L += sweep_lines(res, a.clients, figs["sweep"])
    L += ["## CPU per GiB against the floor", "",
          "utime + stime (from /proc/PID/stat) of the processes that terminate TLS (regproxy; nginx's workers, not "
          "its CONNECT front; the distribution mirror; mitmproxy) over one pull of `big`, ÷ GiB pulled. Loopback "
          "warm: origin stopped; site uplink warm: origin up.", "",
          f"The floor, measured in the same run by `openssl speed -evp` on 16 KiB blocks (median of 3; openssl "
          f"divides by its own CPU time): cold = decrypt with the upstream's suite ({floor['up']}: "
          f"{floor['dec'] / 1e9:.2f} GB/s) + encrypt with the client's ({floor['down']}: {floor['enc'] / 1e9:.2f} GB/s) "
          f"+ SHA-256 ({floor['sha'] / 1e9:.2f} GB/s) = **{floor['cold']:.2f} CPU-s/GiB**; warm = encrypt only = "
          f"**{floor['warm']:.2f} CPU-s/GiB**. Suites: "
          + ("assumed (regproxy logged none)." if floor["assumed"] else
             "as regproxy negotiated them with skopeo and with the origin (its `regproxy::tls` debug lines)."), ""]
    L += cpu_table(res, names, floor)
    L += ["", figs["cpu"]] if "cpu" in figs else []
    L += profile_lines(res.profiles)
    L += fleet_lines(res.fleet)
    L += ["", "## Machine", ""]
    L += [f"- **{k}**: {v}" for k, v in mach.items()]
    L += ["", "## Goals: loopback (medians of this run)", "", "| goal | measured | result |", "|---|---|---|"] + goals
    if why:
        L += ["", "Where the time goes (CPU accounting of the same runs):", ""] + why
    L += ["", "## Setup (loopback)", "",
          "- **origin**: Debian's docker-registry (distribution 2.8) over TLS on 127.0.0.1, named `registry.test` "
          "(test CA; leaf with DNS:registry.test and IP:127.0.0.1). Images generated by `tests/support/mkimage.py` "
          "(incompressible, gzip level 0): `big` 1 × 200 MiB, `many` 100 × 64 KiB, "
          f"`huge` 1 × {huge_label}.",
          "- **client**: `skopeo copy docker://… oci:DIR` (DIR removed after each pull), empty registries.conf and "
          "auth file; `--src-cert-dir` with the CA the client must trust. Times are wall clock around the skopeo process(es). "
          "**ctr**: a private containerd (namespaces do not share content), `ctr content fetch --hosts-dir` with the "
          "peer's CA in hosts.toml, a new namespace per pull; wall clock around ctr.",
          "- **direct**: skopeo to `127.0.0.1:PORT` (no proxy).",
          "- **tunnel**: `bench/tunnel.py`, a blind CONNECT proxy (Python asyncio), `HTTPS_PROXY`.",
          "- **regproxy**: `--intercept registry.test --resolve … --upstream-ca … --allow-port …`, fresh cache dir "
          "for each cold case, `HTTPS_PROXY`.",
          "- **distribution**: a second docker-registry with `proxy: remoteurl: https://127.0.0.1:ORIGIN` "
          "(pull-through mirror; `SSL_CERT_FILE` holds the origin CA); skopeo pulls from it directly, fresh storage for each cold case.",
          "- **nginx**: nginx MITM cache like rpardini/docker-registry-proxy: a CONNECT front (`bench/tunnel.py` "
          "mapping registry.test:PORT to nginx, where rpardini uses nginx's proxy_connect module) → nginx TLS server "
          "with a leaf for registry.test from its own CA → `proxy_cache` (key `$uri`, blobs and manifests by digest "
          "60 d, tags and `/v2/` 1 s with `proxy_cache_use_stale`), `proxy_cache_lock on`, upstream TLS verified "
          "(`proxy_ssl_verify`, `proxy_ssl_name registry.test`). Fresh cache for each cold case; the log of cache "
          "statuses is checked (MISS when cold, HIT when warm).",
          "- **mitmproxy**: `mitmdump --set stream_large_bodies=1m --set connection_strategy=lazy`, upstream TLS "
          "verified against the origin CA, a 5-line addon (`bench/mitm_resolve.py`) mapping registry.test to "
          "127.0.0.1. A reference MITM: it does not cache, so it has no warm case.",
          "- Ratios are median ÷ median of the same run. For throughput a ratio above 1 is better; for times and "
          "memory below 1 is better. Peers run one after another within a round, in the order shown; rounds repeat that.",
          ""]
    L += ["## Loopback results", ""]
    L += res.table(names, skip=WAN_CASES)
    if failures:
        L += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    if res.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    if metrics:
        L += ["## regproxy metrics at the end (non-zero)", "", "```", metrics, "```", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
