//! Log lines for standard error, written in batches: a `write(2)` for every line (the access
//! log's, one per request) took a quarter of the CPU of a small cached answer.
//!
//! Access-log lines wait at most [`LINGER`], or until [`BATCH`] bytes have gathered; every other
//! line (start-up, warnings, errors, debugging) is written at once, after the lines gathered
//! before it, so that nothing is reordered and what explains a failure is never held back.
//!
//! In the plain-text format the access lines skip the log subscriber ([`access_line`]): its
//! generic formatting of a line took a sixth of the CPU of a small cached answer. They come out
//! byte for byte as the subscriber writes them (a test holds the two side by side).

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Gathered bytes that are written at once.
const BATCH: usize = 64 * 1024;
/// The longest a gathered line waits.
const LINGER: Duration = Duration::from_millis(50);
/// The target of the access log's lines, one per request: the only lines gathered.
pub(crate) const ACCESS: &str = "regproxy::access";

/// Where [`access_line`] writes, once the log format lets it.
static ACCESS_LINES: OnceLock<LogWriter> = OnceLock::new();

/// The lines not yet written, and the writer thread's wake-up for the first of them.
#[derive(Default)]
struct Pending {
    bytes: Mutex<Vec<u8>>,
    first: Condvar,
}

/// Where the log subscriber writes: gathers lines and has a thread write them out.
#[derive(Clone)]
pub struct LogWriter {
    pending: Arc<Pending>,
    // No writer thread could be started: every line is written at once.
    direct: bool,
}

impl LogWriter {
    /// A writer whose gathered lines a thread of its own writes out; a panic writes them first.
    pub fn start() -> LogWriter {
        let pending = Arc::new(Pending::default());
        let thread = pending.clone();
        let started = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || loop {
                {
                    let mut bytes = thread.bytes.lock();
                    thread.first.wait_while(&mut bytes, |b| b.is_empty());
                }
                std::thread::sleep(LINGER);
                write_out(&mut thread.bytes.lock());
            });
        let writer = LogWriter {
            pending,
            direct: started.is_err(),
        };
        let on_panic = writer.pending.clone();
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Not waiting for the lock: the panic may have come while it was held.
            if let Some(mut bytes) = on_panic.bytes.try_lock() {
                write_out(&mut bytes);
            }
            default_hook(info);
        }));
        writer
    }

    /// Writes out every gathered line now (before the process exits).
    pub fn flush(&self) {
        write_out(&mut self.pending.bytes.lock());
    }

    /// Lets [`access_line`] write the access lines here itself; only for the subscriber's plain
    /// text format without colours, the one [`access_line`] writes.
    pub fn take_access_lines(&self) {
        let _ = ACCESS_LINES.set(self.clone());
    }

    /// Adds `line` to the gathered lines; writes them all out at once if `urgent`, or when
    /// they fill a batch.
    fn gather(&self, line: &[u8], urgent: bool) {
        let mut bytes = self.pending.bytes.lock();
        let first = bytes.is_empty();
        bytes.extend_from_slice(line);
        if urgent || self.direct || bytes.len() >= BATCH {
            write_out(&mut bytes);
        } else if first {
            self.pending.first.notify_one();
        }
    }
}

/// Writes an `INFO` line of the access log whose message and fields `fields` writes, as the
/// subscriber's plain text format would; `false` when the subscriber must write it instead
/// (another format, colours, or no log writer yet).
pub(crate) fn access_line(fields: impl FnOnce(&mut Vec<u8>)) -> bool {
    let Some(writer) = ACCESS_LINES.get() else {
        return false;
    };
    thread_local! {
        static LINE: RefCell<(Vec<u8>, Second)> = const { RefCell::new((Vec::new(), Second::NONE)) };
    }
    // Not available while the thread's locals are torn down: the subscriber writes it then.
    let written = LINE.try_with(|cell| {
        let Ok(mut cell) = cell.try_borrow_mut() else {
            return false;
        };
        let (line, second) = &mut *cell;
        line.clear();
        text_line(line, second, SystemTime::now(), fields);
        writer.gather(line, false);
        true
    });
    written.unwrap_or(false)
}

/// The date and time of day of one second, as [`timestamp`] writes it: formatted once a second.
pub(crate) struct Second {
    at: u64,
    text: String,
}

impl Second {
    /// No second yet.
    pub(crate) const NONE: Second = Second {
        at: u64::MAX,
        text: String::new(),
    };
}

/// `now`, the level and the target as the subscriber's text format starts an access line, then
/// what `fields` writes, then the end of the line.
pub(crate) fn text_line(
    out: &mut Vec<u8>,
    second: &mut Second,
    now: SystemTime,
    fields: impl FnOnce(&mut Vec<u8>),
) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    timestamp(out, second, since.as_secs(), since.subsec_micros());
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(ACCESS.as_bytes());
    out.extend_from_slice(b": ");
    fields(out);
    out.push(b'\n');
}

/// `2026-12-02T08:02:14.436001Z`, as tracing-subscriber's `SystemTime` writes it; the date and
/// time of day come from `second` while it is the same second, the microseconds every time.
fn timestamp(out: &mut Vec<u8>, second: &mut Second, secs: u64, micros: u32) {
    if second.at != secs {
        second.at = secs;
        second.text.clear();
        let t = i64::try_from(secs)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let _ = std::fmt::Write::write_fmt(
            &mut second.text,
            format_args!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
        );
    }
    out.extend_from_slice(second.text.as_bytes());
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push(b'.');
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// Writes `bytes` to standard error and empties it (its room is kept for the next lines).
fn write_out(bytes: &mut Vec<u8>) {
    if !bytes.is_empty() {
        // Nowhere to report a failure to write the log.
        let _ = std::io::stderr().write_all(bytes);
        bytes.clear();
    }
}

/// One log line on its way: gathered, or written at once with what was gathered before it.
pub struct Line<'a> {
    writer: &'a LogWriter,
    urgent: bool,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            writer: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            writer: self,
            urgent: meta.target() != ACCESS || *meta.level() <= Level::WARN,
        }
    }
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.writer.gather(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
