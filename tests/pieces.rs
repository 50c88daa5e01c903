//! Ranged pieces from a hostile upstream: a blob larger than a piece comes in pieces over
//! several connections, the first request already asking for the first piece, and an upstream
//! that answers those ranged `GET`s wrongly never gets wrong bytes served, cached, or ended
//! cleanly. A piece that is not what was asked for (a 200, another range or total, a malformed
//! `Content-Range`, too few or too many bytes, an encoding, a stall) makes the rest come in one
//! request (a range, or all of the blob if that range is answered wrongly too), verified as ever;
//! a first piece with a wrong head makes the whole blob come in one `GET`; an upstream that
//! ignores ranges is read whole from its first answer; wrong bytes in a well-formed piece fail
//! the digest: the client's response is cut and the next pull asks the upstream again. The
//! client is curl through the proxy, over HTTP/1.1 and h2. Last, blobs of every size around a
//! piece's, the empty one too, through a real registry: every byte crosses once.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use regproxy::Config;
use support::*;

const HOST: &str = "blobs.test";
/// regproxy's piece (`upstream::pieces::PIECE`).
const PIECE: usize = 2 << 20;
/// Ten pieces.
const SIZE: usize = 20 << 20;
/// Where the piece answered wrongly starts: three pieces (the first answer's and two ranged
/// ones) have gone out before it, so the request for the rest must start after them.
const BAD: usize = 3 * PIECE;
/// How long a stalled answer stalls: longer than the fill's own stall bound (60 s), so that only
/// a bound on the piece itself gives it up in time to fall back.
const STALL: Duration = Duration::from_secs(90);
/// The proxy's `--upstream-timeout` here: what a stalled piece may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How the scripted upstream answers the ranged `GET` of the piece at a given start (every
/// ranged `GET` for `Ignored`). Whole `GET`s and the other pieces it answers truthfully.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wrong {
    /// 200 and the whole blob.
    Whole200,
    /// Every ranged `GET`: 200 and the whole blob, as if `Range` were not there.
    Ignored,
    /// A 206 of the bytes one further on, saying so in its `Content-Range`.
    OtherRange,
    /// A 206 of the right bytes whose `Content-Range` names another total.
    OtherTotal,
    /// `Content-Range: bytes A-B`, without the total.
    NoTotal,
    /// `Content-Range: bytes=A-B/N`, the request's syntax.
    Malformed,
    /// The right head and the right bytes, with `Content-Encoding: gzip`.
    Encoded,
    /// Nothing at all, for longer than the proxy waits for a head.
    StallHead,
    /// The right head with its `Content-Length`, then half the bytes, then the connection closed.
    Short,
    /// The right head without a `Content-Length`, then half the bytes, then closed.
    ShortUnframed,
    /// The right head without a `Content-Length`, then the bytes and 1 KiB more of the object
    /// (zeros past its end).
    LongUnframed,
    /// A `Content-Length` one more than the range, and one byte more of the object.
    LongFramed,
    /// The right head, half the bytes, then nothing for longer than the fill waits.
    StallBody,
    /// A well-formed 206 of the range asked for, with one byte flipped.
    FlippedByte,
}

/// What the scripted upstream writes for one request, and where it stalls.
struct Scripted {
    head: String,
    body: Vec<u8>,
    stall_before: bool,
    stall_after: bool,
}

impl Scripted {
    fn new(status: &str, headers: String, body: &[u8]) -> Scripted {
        let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n{headers}Connection: close\r\n\r\n");
        Scripted {
            head,
            body: body.to_vec(),
            stall_before: false,
            stall_after: false,
        }
    }

    fn whole(data: &[u8]) -> Scripted {
        let headers = format!("Accept-Ranges: bytes\r\nContent-Length: {}\r\n", data.len());
        Scripted::new("200 OK", headers, data)
    }

    /// A 206 of `body` saying `range`, with a `Content-Length` of `length` if any.
    fn partial(body: &[u8], range: String, length: Option<usize>) -> Scripted {
        let length = length.map_or(String::new(), |n| format!("Content-Length: {n}\r\n"));
        let headers = format!("Content-Range: {range}\r\n{length}");
        Scripted::new("206 Partial Content", headers, body)
    }

    fn write(self, w: &mut dyn Write) {
        if self.stall_before {
            thread::sleep(STALL);
        }
        if w.write_all(self.head.as_bytes()).is_err() || w.write_all(&self.body).is_err() {
            return;
        }
        if self.stall_after {
            let _ = w.flush();
            thread::sleep(STALL);
        }
    }
}

/// The answer to a ranged `GET` of bytes `a..=b` of `data`, wrong as `wrong` says.
fn wrongly(data: &[u8], (a, b): (usize, usize), wrong: Wrong) -> Scripted {
    let n = data.len();
    let (part, len) = (&data[a..=b], b + 1 - a);
    let right = format!("bytes {a}-{b}/{n}");
    match wrong {
        Wrong::Whole200 | Wrong::Ignored => Scripted::whole(data),
        Wrong::OtherRange => {
            let (a, b) = (a + 1, (b + 1).min(n - 1));
            Scripted::partial(&data[a..=b], format!("bytes {a}-{b}/{n}"), Some(b + 1 - a))
        }
        Wrong::OtherTotal => Scripted::partial(part, format!("bytes {a}-{b}/{}", n + 1), Some(len)),
        Wrong::NoTotal => Scripted::partial(part, format!("bytes {a}-{b}"), Some(len)),
        Wrong::Malformed => Scripted::partial(part, format!("bytes={a}-{b}/{n}"), Some(len)),
        Wrong::Encoded => {
            let mut s = Scripted::partial(part, right, Some(len));
            s.head = s
                .head
                .replace("\r\n\r\n", "\r\nContent-Encoding: gzip\r\n\r\n");
            s
        }
        Wrong::StallHead => Scripted {
            stall_before: true,
            ..Scripted::partial(part, right, Some(len))
        },
        Wrong::Short => Scripted::partial(&part[..len / 2], right, Some(len)),
        Wrong::ShortUnframed => Scripted::partial(&part[..len / 2], right, None),
        Wrong::LongUnframed => Scripted::partial(&longer(data, a, len + 1024), right, None),
        Wrong::LongFramed => Scripted::partial(&longer(data, a, len + 1), right, Some(len + 1)),
        Wrong::StallBody => Scripted {
            stall_after: true,
            ..Scripted::partial(&part[..len / 2], right, Some(len))
        },
        Wrong::FlippedByte => {
            let mut s = Scripted::partial(part, right, Some(len));
            s.body[len / 2] ^= 0xff;
            s
        }
    }
}

/// `len` bytes of `data` from `a`: those it has, then zeros.
fn longer(data: &[u8], a: usize, len: usize) -> Vec<u8> {
    let mut out = data[a..data.len().min(a + len)].to_vec();
    out.resize(len, 0);
    out
}

/// The range `a-b` a request head asks for, if any.
fn range_of(head: &str) -> Option<(usize, usize)> {
    head.lines().find_map(|l| {
        let v = l.to_ascii_lowercase();
        let (a, b) = v.strip_prefix("range: bytes=")?.trim().split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
}

/// The upstream of one blob at `/v2/x/blobs/DIGEST` of [`HOST`], wrong as `wrong` says for the
/// range starting `at`; its
/// port and the request heads it saw.
fn upstream(
    dir: &Path,
    data: Arc<Vec<u8>>,
    (wrong, at): (Wrong, usize),
) -> (u16, Arc<Mutex<Vec<String>>>) {
    tiny_https(dir, &[HOST], move |head, w| {
        let scripted = match range_of(head) {
            // As servers do, a range past the end is cut at the end.
            Some((a, b)) if a == at || wrong == Wrong::Ignored => {
                wrongly(&data, (a, b.min(data.len() - 1)), wrong)
            }
            Some((a, b)) => {
                let b = b.min(data.len() - 1);
                let range = format!("bytes {a}-{b}/{}", data.len());
                Scripted::partial(&data[a..=b], range, Some(b + 1 - a))
            }
            None => Scripted::whole(&data),
        };
        scripted.write(w);
    })
}

/// A blob behind a scripted upstream, and a proxy in front of it.
struct Case {
    dir: PathBuf,
    data: Arc<Vec<u8>>,
    digest: String,
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    proxy: Proxy,
}

/// A blob of [`SIZE`] bytes made from `seed`, and its digest.
fn blob(seed: u64) -> (Arc<Vec<u8>>, String) {
    let data = random_bytes(SIZE, seed);
    let digest = sha256_digest(&data);
    (Arc::new(data), digest)
}

impl Case {
    /// `blob` behind an upstream (in `dir`) wrong as `wrong` says for the range starting `at`,
    /// and a proxy with `connections` per blob that waits [`UPSTREAM_TIMEOUT`] for an upstream.
    fn new(
        dir: PathBuf,
        (data, digest): (Arc<Vec<u8>>, String),
        wrong: (Wrong, usize),
        connections: usize,
    ) -> Case {
        let (port, seen) = upstream(&dir, data.clone(), wrong);
        let ca = dir.join("ca.crt");
        let proxy = Proxy::start(|c: &mut Config| {
            reach_test_host(c, HOST, port, ca);
            c.blob_connections = connections;
            c.upstream_timeout = UPSTREAM_TIMEOUT;
        });
        Case {
            dir,
            data,
            digest,
            port,
            seen,
            proxy,
        }
    }

    /// Pulls the blob with curl through the proxy (`http`: `--http1.1` or `--http2`).
    fn pull(&self, http: &str) -> Pull {
        let url = format!("https://{HOST}:{}/v2/x/blobs/{}", self.port, self.digest);
        curl_via(&self.proxy, &url, &self.dir, http)
    }

    /// Pulls the blob and asserts that the pull was complete and its bytes right.
    fn pull_whole(&self, http: &str, what: &str) {
        let pull = self.pull(http);
        assert!(pull.ok, "{what}: curl failed: {}", pull.stderr);
        assert_eq!(pull.status, "200", "{what}");
        assert_eq!(pull.body.len(), self.data.len(), "{what}: length");
        assert!(pull.body == *self.data, "{what}: wrong bytes served");
    }

    /// The ranged `GET`s the upstream saw, by where they start.
    fn ranges_asked(&self) -> Vec<usize> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter_map(|h| range_of(h))
            .map(|r| r.0)
            .collect()
    }

    /// Where the ranged `GET`s of the rest of the blob after a failed piece start (to the
    /// blob's end, and longer than a piece).
    fn rests_asked(&self) -> Vec<usize> {
        let seen = self.seen.lock().unwrap();
        let ranges = seen.iter().filter_map(|h| range_of(h));
        ranges
            .filter(|&(a, b)| b + 1 == SIZE && b + 1 - a > PIECE)
            .map(|r| r.0)
            .collect()
    }

    /// The `GET`s the upstream saw: all of them, and the whole (unranged) ones.
    fn gets(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        let all = seen.iter().filter(|h| h.starts_with("GET "));
        (
            all.clone().count(),
            all.filter(|h| range_of(h).is_none()).count(),
        )
    }

    fn cached(&self) -> PathBuf {
        cached_object(self.proxy.cache_dir(), &self.digest)
    }

    /// Pulls the blob over HTTP/1.1 then h2 and asserts that neither ended cleanly, nothing was
    /// cached, and each pull asked the upstream (its first piece) again; `check` sees each pull.
    fn assert_never_served_cleanly(&self, what: &str, check: impl Fn(&str, &Pull)) {
        for (n, http) in ["--http1.1", "--http2"].into_iter().enumerate() {
            let pull = self.pull(http);
            assert!(!pull.ok, "{http}: {what} ended cleanly ({})", pull.status);
            check(http, &pull);
            let m = metrics(&self.proxy);
            assert_eq!(sample(&m, "regproxy_cache_entries"), 0, "{http}: cached");
            assert!(!self.cached().exists(), "{http}: cached");
            let firsts = self.ranges_asked().iter().filter(|a| **a == 0).count();
            assert_eq!(firsts, n + 1, "{http}: the pull did not ask the upstream");
        }
    }

    /// Waits for the blob to be cached, then pulls it again (over h2): from the cache, the
    /// upstream not asked.
    fn assert_cached_and_served(&self, what: &str) {
        self.assert_cached(what);
        let before = self.gets();
        self.pull_whole("--http2", &format!("{what}, from the cache"));
        assert_eq!(self.gets(), before, "{what}: asked the upstream again");
    }

    /// Waits for the blob's commit (its last byte goes out once verified, the commit follows);
    /// panics after 30 s.
    fn assert_cached(&self, what: &str) {
        let committed = || self.cached().exists().then_some(());
        wait_for(Duration::from_secs(30), committed, || {
            format!("{what}: not cached")
        });
    }
}

/// Gets `url` with curl through `proxy` (`http`: `--http1.1` or `--http2`), the body into a
/// file in `dir`.
fn curl_via(proxy: &Proxy, url: &str, dir: &Path, http: &str) -> Pull {
    let out = dir.join("pulled");
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", http, "-w", "%{http_code}", "-o"])
        .arg(&out)
        .args(["--proxy", &proxy.url(), "--cacert"])
        .arg(proxy.ca_cert_path())
        .arg(url);
    proxy_env(&mut cmd, None);
    // Longer than any bound of the proxy's: a hang is the proxy's failure, reported as such.
    let done = run_with_timeout(&mut cmd, Duration::from_secs(240));
    Pull {
        ok: done.status.success(),
        status: String::from_utf8_lossy(&done.stdout).into_owned(),
        body: std::fs::read(out).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&done.stderr).into_owned(),
    }
}

/// One pull of a blob by curl through the proxy.
struct Pull {
    /// curl exited 0: a complete response, as long as its framing said.
    ok: bool,
    status: String,
    body: Vec<u8>,
    stderr: String,
}

/// For each of `wrongs`: the piece at [`BAD`] answered so makes the rest come in one request;
/// the client gets the blob whole and right, it is cached, and a second pull is served from the
/// cache.
fn assert_falls_back(wrongs: &[Wrong]) {
    require_tool("curl");
    let dir = TestDir::new();
    let blob = blob(23);
    for &wrong in wrongs {
        let what = format!("{wrong:?}");
        let case = Case::new(dir.join(&what), blob.clone(), (wrong, BAD), 4);
        case.pull_whole("--http1.1", &what);
        let asked = case.ranges_asked();
        assert!(
            asked.contains(&BAD),
            "{what}: no piece at {BAD} asked for: {asked:?}"
        );
        let m = metrics(&case.proxy);
        assert!(
            sample(&m, "regproxy_piece_fallbacks_total") >= 1,
            "{what}: no fallback"
        );
        let rests = case.rests_asked();
        assert_eq!(
            rests.len(),
            1,
            "{what}: the rest asked for as one range: {rests:?}"
        );
        // The upstream answers that range wrongly too if it starts at BAD: then comes all of it.
        let whole = usize::from(rests[0] == BAD);
        assert_eq!(case.gets().1, whole, "{what}: whole GETs");
        case.assert_cached_and_served(&what);
    }
}

/// Pieces whose head is not what was asked for: a 200, another range, another total, a
/// malformed `Content-Range`, an encoding, no head at all within `--upstream-timeout`.
#[test]
fn pieces_with_a_wrong_head_fall_back_to_one_request_for_the_rest() {
    assert_falls_back(&[
        Wrong::Whole200,
        Wrong::OtherRange,
        Wrong::OtherTotal,
        Wrong::NoTotal,
        Wrong::Malformed,
        Wrong::Encoded,
        Wrong::StallHead,
    ]);
}

/// Pieces with a right head and a body of the wrong length (framed or not), or one that stalls
/// part way.
#[test]
fn pieces_with_a_wrong_length_fall_back_to_one_request_for_the_rest() {
    assert_falls_back(&[
        Wrong::Short,
        Wrong::ShortUnframed,
        Wrong::LongUnframed,
        Wrong::LongFramed,
        Wrong::StallBody,
    ]);
}

/// The first request, for the first piece, answered with a wrong head (another range or total,
/// a malformed `Content-Range`, an encoding, a length that is not the piece's): the blob is asked
/// for whole, once, and comes in that one answer.
#[test]
fn a_first_piece_with_a_wrong_head_makes_the_blob_come_whole() {
    let wrongs = [
        Wrong::OtherRange,
        Wrong::NoTotal,
        Wrong::Malformed,
        Wrong::Encoded,
        Wrong::LongFramed,
    ];
    assert_first_answer_alone(37, &wrongs, (2, 1), 1);
}

/// For each of `wrongs` in the answer to the first request: the blob comes whole and right from
/// `gets` (GETs, whole GETs), no further piece is asked, `fallbacks` are counted, and it is
/// cached and served from there.
fn assert_first_answer_alone(seed: u64, wrongs: &[Wrong], gets: (usize, usize), fallbacks: u64) {
    require_tool("curl");
    let dir = TestDir::new();
    let blob = blob(seed);
    for &wrong in wrongs {
        let what = format!("first {wrong:?}");
        let case = Case::new(dir.join(&what), blob.clone(), (wrong, 0), 4);
        case.pull_whole("--http1.1", &what);
        assert_eq!(case.ranges_asked(), vec![0], "{what}: ranges asked for");
        assert_eq!(case.gets(), gets, "{what}: GETs, whole GETs");
        let m = metrics(&case.proxy);
        assert_eq!(sample(&m, "regproxy_upstream_pieces_total"), 0, "{what}");
        let counted = sample(&m, "regproxy_piece_fallbacks_total");
        assert_eq!(counted, fallbacks, "{what}: fallbacks");
        case.assert_cached_and_served(&what);
    }
}

/// A first piece whose `Content-Range` names another total than the blob's: the client is
/// promised that many bytes, the upstream's later answers contradict it, and the response is cut
/// short; nothing is cached, and the next pull asks again.
#[test]
fn a_first_piece_with_another_total_is_never_served_cleanly_nor_cached() {
    require_tool("curl");
    let dir = TestDir::new();
    let case = Case::new(dir.join("up"), blob(47), (Wrong::OtherTotal, 0), 4);
    case.assert_never_served_cleanly("a wrong total", |_, _| {});
}

/// The first piece with a right head and a body of the wrong length, or one that stalls part
/// way: the bytes it gave that were right go out, and the rest comes in one ranged request.
#[test]
fn a_first_piece_of_the_wrong_length_falls_back_to_one_request_for_the_rest() {
    require_tool("curl");
    let dir = TestDir::new();
    let blob = blob(41);
    let wrongs = [
        Wrong::Short,
        Wrong::ShortUnframed,
        Wrong::LongUnframed,
        Wrong::StallBody,
    ];
    for wrong in wrongs {
        let what = format!("first {wrong:?}");
        let case = Case::new(dir.join(&what), blob.clone(), (wrong, 0), 4);
        case.pull_whole("--http1.1", &what);
        let m = metrics(&case.proxy);
        assert!(
            sample(&m, "regproxy_piece_fallbacks_total") >= 1,
            "{what}: no fallback"
        );
        let rests = case.rests_asked();
        assert!(
            rests.len() == 1 && rests[0] > 0 && rests[0] <= PIECE,
            "{what}: the rest asked for as one range after the bytes passed on: {rests:?}"
        );
        assert_eq!(case.gets().1, 0, "{what}: whole GETs");
        case.assert_cached_and_served(&what);
    }
}

/// An upstream that ignores `Range` (or answers the first piece with the whole blob): its first
/// answer, a 200, is the blob, read whole; nothing more is asked.
#[test]
fn an_upstream_that_ignores_ranges_is_read_whole_from_its_first_answer() {
    assert_first_answer_alone(43, &[Wrong::Ignored, Wrong::Whole200], (1, 0), 0);
}

/// A well-formed piece with one wrong byte: the digest fails at the end, the client's response
/// is cut (HTTP/1.1 and h2), nothing is cached, and the next pull asks the upstream again.
#[test]
fn wrong_bytes_in_a_piece_are_never_served_cleanly_nor_cached() {
    require_tool("curl");
    let dir = TestDir::new();
    let case = Case::new(dir.join("up"), blob(29), (Wrong::FlippedByte, BAD), 4);
    case.assert_never_served_cleanly("a corrupt blob", |http, pull| {
        assert!(pull.body.len() < SIZE, "{http}: every byte went out");
        let asked = case.ranges_asked();
        assert!(
            asked.contains(&BAD),
            "{http}: the bad piece was not asked for: {asked:?}"
        );
    });
}

/// `--blob-connections 1`: no ranged `GET` at all, so an upstream whose ranges are corrupt
/// still gives a right pull, in one stream.
#[test]
fn one_blob_connection_asks_for_no_range() {
    require_tool("curl");
    let dir = TestDir::new();
    let case = Case::new(dir.join("up"), blob(31), (Wrong::FlippedByte, 0), 1);
    case.pull_whole("--http1.1", "one stream");
    assert_eq!(case.ranges_asked(), Vec::<usize>::new(), "ranges asked for");
    assert_eq!(case.gets(), (1, 1));
    let m = metrics(&case.proxy);
    assert_eq!(sample(&m, "regproxy_upstream_pieces_total"), 0);
    case.assert_cached("one stream");
}

/// Pushes `data` as a blob of `repo` straight to `registry` (a two-step upload with curl); its
/// digest.
fn push_blob(registry: &Registry, repo: &str, data: &[u8], dir: &Path) -> String {
    let digest = sha256_digest(data);
    let file = dir.join(digest.replace(':', "-"));
    std::fs::write(&file, data).unwrap();
    let base = format!("https://{}", registry.direct_host());
    let curl = |args: &[&str]| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-f", "--cacert"])
            .arg(registry.ca_cert_path())
            .args(args);
        proxy_env(&mut cmd, None);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
        assert_success(&out, "curl to the registry");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let head = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
    ]);
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or(l.strip_prefix("location: "))
        })
        .expect("an upload location")
        .trim()
        .to_owned();
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = if location.starts_with('/') {
        format!("{base}{location}{sep}digest={digest}")
    } else {
        format!("{location}{sep}digest={digest}")
    };
    let upload = format!("@{}", file.display());
    // Not a form (curl's default type): the registry would read the body as its fields.
    let binary = "Content-Type: application/octet-stream";
    curl(&["-X", "PUT", "-H", binary, "--data-binary", &upload, &put]);
    digest
}

/// Blobs of every size around a piece's, the empty one too, through the proxy from a real
/// registry (which answers ranges): each comes right, is cached, and every byte crosses from the
/// registry once; one no larger than a piece in one request.
#[test]
fn blobs_of_every_size_around_a_piece_cross_once() {
    require_tool("curl");
    let dir = TestDir::new();
    let registry = Registry::start(dir.join("registry"));
    let proxy = Proxy::for_registry(&registry);
    let sizes = [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 5];
    for (n, size) in sizes.into_iter().enumerate() {
        let data = random_bytes(size, 50 + n as u64);
        let digest = push_blob(&registry, "test/sizes", &data, &dir.join(""));
        let url = format!("https://{}/v2/test/sizes/blobs/{digest}", registry.host());
        let pull = curl_via(&proxy, &url, &dir.join(""), "--http1.1");
        assert!(
            pull.ok && pull.status == "200",
            "{size} bytes: {}",
            pull.stderr
        );
        assert!(pull.body == data, "{size} bytes: wrong bytes");
        let carried = registry.blob_bytes(&digest);
        assert_eq!(carried, size as u64, "{size} bytes: bytes carried");
        if size <= PIECE {
            assert_eq!(registry.blob_gets(&digest), 1, "{size} bytes: GETs");
        }
        let cached = || {
            cached_object(proxy.cache_dir(), &digest)
                .exists()
                .then_some(())
        };
        wait_for(Duration::from_secs(30), cached, || {
            format!("{size} bytes: not cached")
        });
    }
}

/// A pooled connection the upstream drops just as it is reused (closed cleanly, or reset with the
/// request unread) costs the client nothing: the body-less `GET` is sent once more on a new
/// connection, and the metrics count that attempt as `retried`, not as an error.
#[test]
fn a_reused_connection_dropped_unanswered_is_asked_again() {
    require_tool("curl");
    for how in [Dropped::Closed, Dropped::Reset] {
        let dir = TestDir::new();
        let blobs: Vec<Vec<u8>> = (0..2)
            .map(|i| random_bytes(1000 + i, 60 + i as u64))
            .collect();
        let digests: Vec<String> = blobs.iter().map(|b| sha256_digest(b)).collect();
        let by_digest: Vec<(String, Vec<u8>)> =
            digests.iter().cloned().zip(blobs.clone()).collect();
        let up = dir.join("up");
        let (port, seen) = tiny_https_dropping_reuse(&up, &[HOST], how, move |head, w| {
            let Some((_, data)) = by_digest.iter().find(|(d, _)| head.contains(d.as_str())) else {
                let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                return;
            };
            let n = data.len();
            let _ = write!(
                w,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{n}\r\nContent-Length: {n}\r\n\r\n",
                n - 1
            );
            let _ = w.write_all(data);
        });
        let ca = dir.join("up/ca.crt");
        let proxy = Proxy::start(|c: &mut Config| reach_test_host(c, HOST, port, ca));
        for (digest, data) in digests.iter().zip(&blobs) {
            let url = format!("https://{HOST}:{port}/v2/x/blobs/{digest}");
            let pull = curl_via(&proxy, &url, &dir.join(""), "--http1.1");
            assert!(
                pull.ok && pull.status == "200",
                "{how:?} {digest}: {}",
                pull.stderr
            );
            assert!(pull.body == *data, "{how:?} {digest}: wrong bytes");
        }
        let heads = seen.lock().unwrap().clone();
        let second = heads.iter().filter(|h| h.contains(&digests[1])).count();
        let want = match how {
            Dropped::Closed => 2, // dropped after it was read, then again
            Dropped::Reset => 1,  // reset unread, then again
        };
        assert_eq!(
            second, want,
            "{how:?}: the second blob's requests: {heads:#?}"
        );
        if how == Dropped::Reset {
            assert!(
                heads.iter().any(|h| h == "reset"),
                "{how:?}: no reuse was reset: {heads:#?}"
            );
        }
        let m = metrics(&proxy);
        let count = |status: &str| {
            m.lines()
                .filter(|l| l.starts_with("regproxy_upstream_requests_total"))
                .filter(|l| l.contains(&format!("status=\"{status}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        };
        assert_eq!(count("retried"), 1, "{how:?}: {m}");
        assert_eq!(count("error"), 0, "{how:?}: {m}");
        assert_eq!(count("206"), 2, "{how:?}: {m}");
    }
}
