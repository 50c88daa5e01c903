"""mitmproxy addon: like regproxy's --resolve, connect somewhere else for a host name.
BENCH_MITM_MAP="registry.test:5000=127.0.0.1:6000,registry.test=127.0.0.1,*.bench.test=127.0.0.1":
NAME:PORT=IP:PORT moves that exact target, NAME=IP keeps the client's port; the first match wins.
The SNI and Host stay the original name, and upstream TLS is still verified."""
import os

MAP = [m.split("=", 1) for m in os.environ.get("BENCH_MITM_MAP", "").split(",") if m]


def server_connect(data):
    host, port = data.server.address
    for name, to in MAP:
        if name == f"{host}:{port}":
            ip, to_port = to.rsplit(":", 1)
            data.server.address = (ip, int(to_port))
            return
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            data.server.address = (to, port)
            return
