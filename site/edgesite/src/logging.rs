//! The process's log: `RUST_LOG`-style levels, plain text off a terminal, and repeated lines
//! limited.
//!
//! A line repeated with the same content (the same place in the code and the same field values)
//! is written at most [`BURST`] times per [`WINDOW`]; the next time it comes after the window, one
//! line says how many were left out. A node that cannot reach something and says so every second
//! then writes a few lines a minute, not 86,400 a day, and nothing else is hidden: lines that
//! differ in any field are counted apart.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter};

/// Identical lines written per window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Distinct lines remembered; the oldest are forgotten past it.
const KEPT: usize = 4096;

struct Seen {
    window_start: Instant,
    written: u32,
    left_out: u64,
    last: Instant,
}

/// A per-layer filter that limits repeated lines (see the module's documentation).
pub struct Repeats {
    seen: Mutex<HashMap<u64, Seen>>,
    /// Where the "left out" lines go: beside the log's own lines (the fmt layer writes to
    /// stdout), not through tracing, which is dispatching the event at hand.
    summary: Box<dyn Fn(&str) + Send + Sync>,
}

impl Default for Repeats {
    fn default() -> Repeats {
        Repeats::with_summary(|line| println!("{line}"))
    }
}

/// Hashes every field of an event, and keeps its message for the summary line.
struct Fingerprint<'a> {
    hasher: &'a mut std::collections::hash_map::DefaultHasher,
    message: String,
}

impl Visit for Fingerprint<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        field.name().hash(self.hasher);
        text.hash(self.hasher);
        if field.name() == "message" {
            self.message = text;
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        field.name().hash(self.hasher);
        value.hash(self.hasher);
        if field.name() == "message" {
            self.message = value.to_string();
        }
    }
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Write,
    /// Write it, after a line saying how many like it were left out.
    WriteAfter(u64),
    LeaveOut,
}

impl Repeats {
    pub fn with_summary(summary: impl Fn(&str) + Send + Sync + 'static) -> Repeats {
        Repeats {
            seen: Mutex::new(HashMap::new()),
            summary: Box::new(summary),
        }
    }

    /// The verdict for a line whose content hashes to `key`, at `now`.
    pub fn judge(&self, key: u64, now: Instant) -> Verdict {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= KEPT && !seen.contains_key(&key) {
            // Forget the line seen longest ago.
            if let Some(oldest) = seen.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k) {
                seen.remove(&oldest);
            }
        }
        let entry = seen.entry(key).or_insert(Seen {
            window_start: now,
            written: 0,
            left_out: 0,
            last: now,
        });
        entry.last = now;
        if now.duration_since(entry.window_start) >= WINDOW {
            let left_out = std::mem::take(&mut entry.left_out);
            entry.window_start = now;
            entry.written = 1;
            return if left_out > 0 {
                Verdict::WriteAfter(left_out)
            } else {
                Verdict::Write
            };
        }
        if entry.written < BURST {
            entry.written += 1;
            Verdict::Write
        } else {
            entry.left_out += 1;
            Verdict::LeaveOut
        }
    }
}

impl<S: Subscriber> Filter<S> for Repeats {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        event.metadata().callsite().hash(&mut hasher);
        let mut fingerprint = Fingerprint {
            hasher: &mut hasher,
            message: String::new(),
        };
        event.record(&mut fingerprint);
        let message = std::mem::take(&mut fingerprint.message);
        match self.judge(hasher.finish(), Instant::now()) {
            Verdict::Write => true,
            Verdict::LeaveOut => false,
            Verdict::WriteAfter(n) => {
                use tracing_subscriber::fmt::time::FormatTime;
                let mut time = String::new();
                let _ = tracing_subscriber::fmt::time::SystemTime
                    .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut time));
                (self.summary)(&format!(
                    "{time}  {:>5} {n} more lines like the next one were left out in the last minute{}",
                    event.metadata().level(),
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({message})")
                    }
                ));
                true
            }
        }
    }
}

/// Sets up the process's log.
pub fn init() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    // kube's client logs every failed request as an error; the agent reports what matters
    // (the API unreachable, the node on its cache) once, itself.
    let levels = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"));
    // Colours only on a terminal: the installer's log file and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_filter(levels.and(Repeats::default()));
    tracing_subscriber::registry().with(layer).init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_lines_are_written_a_few_times_per_window_then_counted() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..8)
            .map(|i| repeats.judge(1, t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Write).count(),
            BURST as usize
        );
        assert_eq!(verdicts.last(), Some(&Verdict::LeaveOut));
        // Another line is counted apart.
        assert_eq!(
            repeats.judge(2, t0 + Duration::from_secs(8)),
            Verdict::Write
        );
        // After the window: the count of those left out, then the line again.
        assert_eq!(
            repeats.judge(1, t0 + WINDOW + Duration::from_secs(1)),
            Verdict::WriteAfter(3)
        );
        assert_eq!(
            repeats.judge(1, t0 + WINDOW + Duration::from_secs(2)),
            Verdict::Write
        );
    }

    #[test]
    fn a_subscriber_writes_a_repeated_line_a_few_times_and_different_lines_always() {
        use std::sync::Arc;
        use tracing_subscriber::layer::{Layer, SubscriberExt};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let out = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .with_filter(Repeats::default());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                tracing::warn!(relay = "r1", "cannot reserve on relay");
            }
            for i in 0..20 {
                tracing::info!(controller = i, "caches synced");
            }
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches("cannot reserve on relay").count(),
            BURST as usize,
            "{text}"
        );
        assert_eq!(text.matches("caches synced").count(), 20, "{text}");
    }

    #[test]
    fn the_table_of_lines_is_bounded() {
        let repeats = Repeats::default();
        let t0 = Instant::now();
        for key in 0..(KEPT as u64 + 100) {
            repeats.judge(key, t0 + Duration::from_millis(key));
        }
        assert!(repeats.seen.lock().unwrap().len() <= KEPT);
    }
}
