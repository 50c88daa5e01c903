"""mitmproxy addon: like regproxy's --resolve, connect somewhere else for a host name.
BENCH_MITM_MAP="registry.test=127.0.0.1,*.bench.test=127.0.0.1": the port stays the client's, the SNI
and Host stay the original name, and upstream TLS is still verified."""
import os

MAP = dict(m.split("=", 1) for m in os.environ.get("BENCH_MITM_MAP", "").split(",") if m)


def server_connect(data):
    host, port = data.server.address
    for name, ip in MAP.items():
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            data.server.address = (ip, port)
            return
