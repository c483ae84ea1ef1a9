//! Logging set-up. Log lines use structured fields and never carry a header
//! value, a query string or a credential.
//!
//! Lines are formatted on the thread that logs, then appended to a shared
//! buffer that a background thread writes to stderr every few milliseconds:
//! with one access-log line per request, a `write(2)` per line (and the wake
//! of whatever reads the pipe) cost more than the rest of the line. A full
//! buffer is written by the logging thread itself, so nothing is dropped.
//! The background thread sleeps until a batch starts, so an idle instance
//! (a sidecar between workflow runs) does not wake up 50 times a second.
//!
//! Leaf module.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The access log's target: one line per proxied request.
pub const ACCESS: &str = "credproxy::access";

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Above this, the appending thread writes the buffer out itself.
const MAX_BUFFERED: usize = 256 * 1024;

/// Whole lines appended by any thread, written to one output in batches
/// by a background thread (the log on stderr, the audit trail). Nothing is
/// dropped: a full buffer is written by the thread that fills it.
pub struct LineBatcher {
    buf: Mutex<Vec<u8>>,
    /// Signalled when a line lands in an empty buffer, and on close.
    started: Condvar,
    /// Taken while the buffer is still held, so batches keep their order.
    out: Mutex<Out>,
    closed: AtomicBool,
}

impl LineBatcher {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            buf: Mutex::default(),
            started: Condvar::new(),
            out: Mutex::new(Out { out, spare: Vec::new() }),
            closed: AtomicBool::new(false),
        }
    }

    /// A batcher writing to `out`, with its thread (named `name`) started.
    pub fn start(name: &str, out: Box<dyn Write + Send>) -> std::io::Result<Arc<Self>> {
        let batcher = Arc::new(Self::new(out));
        let bg = batcher.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || bg.run())?;
        Ok(batcher)
    }

    /// Waits for a batch to start, lets it collect lines, writes it; until closed.
    fn run(&self) {
        loop {
            let Ok(guard) = self.buf.lock() else { return };
            let Ok(guard) = self.started.wait_while(guard, |b| b.is_empty() && !self.is_closed()) else { return };
            if self.is_closed() {
                return self.write_out(guard);
            }
            drop(guard);
            #[allow(clippy::disallowed_methods, reason = "a dedicated OS thread, not a runtime worker")]
            std::thread::sleep(FLUSH_EVERY);
            let Ok(guard) = self.buf.lock() else { return };
            self.write_out(guard);
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Appends one or more whole lines.
    pub fn append(&self, lines: &[u8]) {
        let Ok(mut buf) = self.buf.lock() else { return };
        let first = buf.is_empty();
        buf.extend_from_slice(lines);
        if buf.len() >= MAX_BUFFERED {
            self.write_out(buf);
        } else if first {
            drop(buf);
            self.started.notify_one();
        }
    }

    /// Appends what `write` writes — whole lines, and nothing that panics
    /// halfway — straight into the batch being collected, under its lock
    /// (no buffer of the caller's to copy from: the audit trail's lines).
    pub fn append_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let Ok(mut buf) = self.buf.lock() else { return };
        let first = buf.is_empty();
        write(&mut buf);
        if buf.len() >= MAX_BUFFERED {
            self.write_out(buf);
        } else if first {
            drop(buf);
            self.started.notify_one();
        }
    }

    /// Writes out what is buffered now.
    pub fn flush(&self) {
        if let Ok(guard) = self.buf.lock() {
            self.write_out(guard);
        }
    }

    /// Writes out what is buffered and ends the background thread; lines
    /// appended later are written when the buffer fills or on [`Self::flush`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.flush();
        self.started.notify_all();
    }

    /// Takes the buffer and writes it outside the buffer lock; the output's
    /// lock is taken first, so chunks reach it in order. Errors are the
    /// output's to count: the batch is gone either way.
    /// The buffer is swapped with the one the last batch was written from
    /// (kept, emptied): a batch does not start from an empty `Vec` and
    /// grow it line by line (~600 instructions a line, copies included).
    fn write_out(&self, mut guard: std::sync::MutexGuard<'_, Vec<u8>>) {
        if guard.is_empty() {
            return;
        }
        let Ok(mut out) = self.out.lock() else { return };
        let Out { out, spare } = &mut *out;
        std::mem::swap(&mut *guard, spare);
        drop(guard);
        let _ = out.write_all(spare).and_then(|()| out.flush());
        spare.clear();
    }
}

/// A batcher's output, and the buffer of the batch written last.
struct Out {
    out: Box<dyn Write + Send>,
    spare: Vec<u8>,
}

static SHARED: OnceLock<Arc<LineBatcher>> = OnceLock::new();

/// The writer the subscriber gets per event: collects one line, appends it
/// to the batcher on drop.
pub struct LineWriter {
    shared: Arc<LineBatcher>,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.shared.append(&self.line);
    }
}

struct Buffered(Arc<LineBatcher>);

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { shared: self.0.clone(), line: Vec::with_capacity(256) }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let shared = SHARED.get_or_init(|| {
        LineBatcher::start("credproxy-log", Box::new(std::io::stderr()))
            .unwrap_or_else(|_| Arc::new(LineBatcher::new(Box::new(std::io::stderr()))))
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Buffered(shared.clone()))
        .with_ansi(ansi)
        .event_format(AccessFast(Format::default().with_target(true)))
        .try_init();
}

/// Access lines are written as they are; every other event goes through
/// `tracing_subscriber`'s default format. The default format escapes what
/// it writes, character by character, which was a third of an access
/// line's cost — and an access line holds only credproxy's own checked
/// values (addresses, connection and integration ids, a method, a URI host
/// and path: no control characters can be in them), so there is nothing to
/// escape. The layout is the default one: time, level, target, message.
struct AccessFast(Format);

impl<S, N> FormatEvent<S, N> for AccessFast
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS {
            return self.0.format_event(ctx, w, event);
        }
        write_timestamp(&mut w)?;
        write!(w, " {:>5} {ACCESS}: ", meta.level().as_str())?;
        let mut message = Message { w: &mut w, result: Ok(()) };
        event.record(&mut message);
        message.result?;
        w.write_char('\n')
    }
}

/// Writes an event's `message` field as it is.
struct Message<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: std::fmt::Result,
}

impl Visit for Message<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            // `Debug` of the message's format arguments is their text.
            self.result = write!(self.w, "{value:?}");
        }
    }
}

/// `2026-12-01T19:20:31.646661Z`, the default format's timestamp.
fn write_timestamp(w: &mut Writer<'_>) -> std::fmt::Result {
    use std::time::{SystemTime, UNIX_EPOCH};
    let mut text = [0u8; TIME_LEN];
    w.write_str(format_time(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(), &mut text))
}

/// Bytes in a [`format_time`] text.
pub const TIME_LEN: usize = 27;

/// `since_epoch` as RFC 3339 UTC with microseconds
/// (`2026-12-01T19:20:31.646661Z`), in `buf`. The part up to the second is
/// formatted once a second per thread; the rest is six digits (no
/// `fmt` machinery: this runs for every access and audit line).
pub fn format_time(since_epoch: Duration, buf: &mut [u8; TIME_LEN]) -> &str {
    format_time_bytes(since_epoch, buf);
    std::str::from_utf8(buf).unwrap_or_default()
}

/// [`format_time`] as ASCII bytes, for writers of bytes (the audit line):
/// checking them as UTF-8 cost about half of the formatting.
pub fn format_time_bytes(since_epoch: Duration, buf: &mut [u8; TIME_LEN]) {
    use std::cell::Cell;
    thread_local! {
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let secs = since_epoch.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let t = secs % 86_400;
        let s = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
        // Years past 9999 do not fit; they are not this program's problem.
        text.copy_from_slice(&s.as_bytes()[..19]);
        SECOND.set((secs, text));
    }
    buf[..19].copy_from_slice(&text);
    buf[19] = b'.';
    let mut micros = since_epoch.subsec_micros();
    for b in buf[20..26].iter_mut().rev() {
        *b = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf[26] = b'Z';
}

/// Year, month, day of a count of days since 1970-01-01 (proleptic
/// Gregorian; H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Writes out buffered log lines now (before exit).
pub fn flush() {
    if let Some(shared) = SHARED.get() {
        shared.flush();
    }
}

/// Now, in unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_with_micros() {
        let mut buf = [0u8; TIME_LEN];
        assert_eq!(format_time(Duration::from_micros(0), &mut buf), "1970-01-01T00:00:00.000000Z");
        let t = Duration::from_micros(1_764_703_580_000_042);
        assert_eq!(format_time(t, &mut buf), "2025-12-02T19:26:20.000042Z");
        assert_eq!(format_time(t + Duration::from_micros(999_000), &mut buf), "2025-12-02T19:26:20.999042Z");
        assert_eq!(format_time(t + Duration::from_secs(1), &mut buf), "2025-12-02T19:26:21.000042Z");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    /// Access lines come out in the default layout, unescaped; other
    /// events keep the default formatter.
    #[test]
    fn access_lines_keep_the_default_layout() {
        let shared = Arc::new(LineBatcher::new(Box::new(std::io::sink())));
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Buffered(shared.clone()))
            .with_ansi(false)
            .event_format(AccessFast(Format::default()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: ACCESS, "peer={} status={}", "127.0.0.1:1", 200);
            tracing::warn!(target: "credproxy::proxy", code = "x", "other");
        });
        let text = String::from_utf8(shared.buf.lock().unwrap().clone()).unwrap();
        let mut lines = text.lines();
        let access = lines.next().unwrap();
        let (time, rest) = access.split_once(' ').unwrap();
        assert!(time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{access}");
        assert_eq!(rest, " INFO credproxy::access: peer=127.0.0.1:1 status=200");
        let other = lines.next().unwrap();
        assert!(other.contains(" WARN credproxy::proxy: other code=\"x\""), "{other}");
    }

    #[test]
    fn lines_are_appended_whole_and_flushed() {
        let shared = Arc::new(LineBatcher::new(Box::new(std::io::sink())));
        let make = Buffered(shared.clone());
        {
            let mut w = make.make_writer();
            w.write_all(b"first ").unwrap();
            w.write_all(b"line\n").unwrap();
            assert!(shared.buf.lock().unwrap().is_empty(), "nothing until the line is complete");
        }
        make.make_writer().write_all(b"second line\n").unwrap();
        assert_eq!(&shared.buf.lock().unwrap()[..], b"first line\nsecond line\n");
    }

    /// An output a test can read after a batcher wrote to it.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every batch reaches the output, in order, and the next batch fills
    /// the buffer the last one was written from (no growing from empty).
    #[test]
    fn batches_keep_their_order_and_reuse_the_last_buffer() {
        let out = Shared::default();
        let batcher = LineBatcher::new(Box::new(out.clone()));
        let mut expected = Vec::new();
        for batch in 0..3 {
            for line in 0..100 {
                let text = format!("batch {batch} line {line}\n");
                batcher.append(text.as_bytes());
                expected.extend_from_slice(text.as_bytes());
            }
            batcher.flush();
            let next = batcher.buf.lock().unwrap().capacity();
            assert!(batcher.buf.lock().unwrap().is_empty());
            if batch > 0 {
                assert!(next >= 1_500, "the batch after {batch} starts from a buffer of {next} bytes");
            }
            let spare = batcher.out.lock().unwrap().spare.capacity();
            assert!(
                spare >= 1_500 && batcher.out.lock().unwrap().spare.is_empty(),
                "the written buffer is kept, emptied"
            );
        }
        assert_eq!(*out.0.lock().unwrap(), expected);
    }
}
