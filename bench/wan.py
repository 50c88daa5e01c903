#!/usr/bin/env python3
"""A WAN between the bench's peers and its origin: a TCP relay on loopback that shapes every
connection through it like one link.

    wan.py --listen 127.0.0.1:PORT --to 127.0.0.1:ORIGIN --delay-ms 20 --mbit 200 [--flow-mbit 40]
           [--stats FILE]

- `--delay-ms`: one way, both directions; a new connection also waits one round trip before its
  first byte moves (the TCP handshake).
- `--mbit`: per direction, shared by every connection (a site's uplink, or a path's total).
- `--flow-mbit`: per connection and direction (what a long, lossy path allows one TCP flow).
- A connection holds at most WINDOW bytes in the link per direction (TCP's window): a receiver
  that stops reading stops its sender, and nothing here buffers without bound.
- `--stats FILE`: what was carried so far, `up down connections` (bytes client to origin, bytes
  origin to client, connections accepted),
  rewritten every 100 ms and at exit, so that the bench can tell how often the origin's bytes
  crossed the link, and over how many connections.

TLS passes through untouched. Stops on SIGTERM.

The relay raises its own CPU priority (nice NICE) where it may: a real link goes on carrying bytes
however busy the hosts at its ends are, and this one shares two CPUs with up to 8 clients.
"""
import argparse, asyncio, os, signal, time

CHUNK = 64 * 1024
WINDOW = 8 << 20
SLACK = 0.02  # s: how late the relay may wake and still be owed the link's time
NICE = -10  # at the default 0, 8 concurrent clients delayed the last byte of 200 MiB by 1.1 s


class Bucket:
    """A link's sending side as a clock: each chunk leaves when the link has sent what it was
    given before. Waiters are served in turn (asyncio.Lock is FIFO), so flows sharing one get
    fair shares, a chunk at a time.

    A real link goes on sending its queue while the host's CPUs are busy; this relay, when it
    wakes late, must not lose that time. So a link that was busy up to SLACK ago carries on from
    where its clock stands, not from now: a token bucket capped at a few ms of burst lost up to
    2 s of a 10 s transfer when 8 clients kept both CPUs busy. A link idle for longer (a round
    trip between requests, 40 ms on the site uplink) starts again from now, banking nothing."""

    def __init__(self, mbit):
        self.rate = mbit * 1e6 / 8
        self.ahead = max(CHUNK, self.rate / 200) / self.rate  # a chunk may leave 5 ms early
        self.free = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        async with self.lock:
            now = time.monotonic()
            start = self.free if self.free >= now - SLACK else now
            self.free = start + n / self.rate
            wait = self.free - self.ahead - now
            if wait > 0:
                await asyncio.sleep(wait)


class Counter:
    def __init__(self):
        self.up = self.down = self.connections = 0


async def carry(reader, writer, buckets, delay, count, direction):
    """Reads chunks, paces them through `buckets`, delivers each `delay` after it was sent."""
    queue = asyncio.Queue()
    room = asyncio.Semaphore(WINDOW // CHUNK)

    async def deliver():
        try:
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                room.release()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            for _ in range(WINDOW // CHUNK):  # the reading side must not wait for room forever
                room.release()

    sender = asyncio.ensure_future(deliver())
    try:
        while not sender.done():
            await room.acquire()
            data = await reader.read(CHUNK)
            if not data:
                break
            for b in buckets:
                await b.take(len(data))
            setattr(count, direction, getattr(count, direction) + len(data))
            queue.put_nowait((time.monotonic() + delay, data))
    except OSError:
        pass
    queue.put_nowait((0, None))
    await sender


async def serve(a):
    delay = a.delay_ms / 1000
    up, down = Bucket(a.mbit), Bucket(a.mbit)
    count = Counter()
    thost, tport = a.to.rsplit(":", 1)

    async def handle(cr, cw):
        count.connections += 1
        try:
            ur, uw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.sleep(2 * delay)  # the TCP handshake
        own_up = [Bucket(a.flow_mbit)] if a.flow_mbit else []
        own_down = [Bucket(a.flow_mbit)] if a.flow_mbit else []
        await asyncio.gather(carry(cr, uw, own_up + [up], delay, count, "up"),
                             carry(ur, cw, own_down + [down], delay, count, "down"),
                             return_exceptions=True)
        for w in (cw, uw):
            w.close()

    async def stats():
        while True:
            write_stats(a.stats, count)
            await asyncio.sleep(0.1)

    lhost, lport = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, lhost, int(lport), limit=CHUNK)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ticker = asyncio.ensure_future(stats()) if a.stats else None
    async with server:
        await stop.wait()
    if ticker:
        ticker.cancel()
        write_stats(a.stats, count)


def write_stats(path, count):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{count.up} {count.down} {count.connections}\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--mbit", type=float, default=200)
    ap.add_argument("--flow-mbit", type=float, default=0, help="per-connection cap (0: none)")
    ap.add_argument("--stats", default="")
    a = ap.parse_args()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except PermissionError:
        print(f"wan.py: may not raise its priority to nice {NICE}; the link loses time when CPUs are busy",
              flush=True)
    asyncio.run(serve(a))


if __name__ == "__main__":
    main()
