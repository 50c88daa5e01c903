//! Log lines for standard error, written in batches: a `write(2)` for every line (the access
//! log's, one per request) took a quarter of the CPU of a small cached answer.
//!
//! Access-log lines wait at most [`LINGER`], or until [`BATCH`] bytes have gathered; every other
//! line (start-up, warnings, errors, debugging) is written at once, after the lines gathered
//! before it, so that nothing is reordered and what explains a failure is never held back.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Gathered bytes that are written at once.
const BATCH: usize = 64 * 1024;
/// The longest a gathered line waits.
const LINGER: Duration = Duration::from_millis(50);
/// The target of the access log's lines, one per request: the only lines gathered.
pub(crate) const ACCESS: &str = "regproxy::access";

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
        let pending = &self.writer.pending;
        let mut bytes = pending.bytes.lock();
        let first = bytes.is_empty();
        bytes.extend_from_slice(line);
        if self.urgent || self.writer.direct || bytes.len() >= BATCH {
            write_out(&mut bytes);
        } else if first {
            pending.first.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
