#!/usr/bin/env python3
"""A blind CONNECT tunnel proxy: the baseline an intercepting proxy is compared with, and the CONNECT
front of the nginx MITM peer (like rpardini/docker-registry-proxy's proxy_connect front).

    tunnel.py --listen 127.0.0.1:3130 [--map registry.test=127.0.0.1] [--map registry.test:5000=127.0.0.1:8443]

It answers CONNECT host:port with 200 and copies bytes both ways. --map NAME=IP sends NAME (any port)
to IP on the same port; --map NAME:PORT=IP:PORT sends that exact target elsewhere.
"""
import argparse, asyncio, sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
    finally:
        try:
            writer.write_eof()
        except OSError:
            pass


async def handle(creader, cwriter, mapping):
    try:
        head = await creader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            cwriter.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            cwriter.close()
            return
        host, port = target.rsplit(":", 1)
        if target in mapping:
            host, port = mapping[target].rsplit(":", 1)
        else:
            host = mapping.get(host, host)
        ureader, uwriter = await asyncio.open_connection(host, int(port))
    except Exception as e:  # noqa: BLE001 - report and drop the client
        print(f"ERROR {e!r}", file=sys.stderr, flush=True)
        cwriter.close()
        return
    cwriter.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(pipe(creader, uwriter), pipe(ureader, cwriter), return_exceptions=True)
    uwriter.close()
    cwriter.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:3130")
    p.add_argument("--map", action="append", default=[])
    a = p.parse_args()
    mapping = dict(m.split("=", 1) for m in a.map)
    host, port = a.listen.rsplit(":", 1)

    async def serve():
        server = await asyncio.start_server(lambda r, w: handle(r, w, mapping), host, int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
