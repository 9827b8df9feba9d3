//! The log sink: request threads append whole lines to one buffer under a short lock, and a
//! background thread writes the buffer out in batches. A request never waits for stdout, and a
//! busy proxy pays one wake-up and one `write` per batch instead of per line (with a channel per
//! line, the wake-ups and writes of the access log cost more than formatting it).
//!
//! Bounds: at most `max_lines` lines and `max_bytes` bytes wait; past either, new lines are
//! dropped and counted. A line waits at most [`BATCH_DELAY`] plus the previous batch's write.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after the first one of a batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
    max_lines: usize,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked while holding the lock left whole lines behind: keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where formatted lines go (`io::Write`, one `write` per line); cheap to clone.
#[derive(Clone)]
pub struct LineSink(Arc<Shared>);

impl LineSink {
    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

impl LineSink {
    /// Queues one whole line (with its newline); never blocks on the writer.
    pub(crate) fn push(&self, line: &[u8]) {
        let shared = &self.0;
        let mut p = shared.lock();
        if p.closed || p.lines >= shared.max_lines || p.bytes.len() + line.len() > shared.max_bytes
        {
            drop(p);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        p.lines += 1;
        drop(p);
        if first {
            shared.wake.notify_one();
        }
    }
}

/// tracing's formatter writes each event with one `write_all`: one call, one line.
impl Write for LineSink {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineSink {
    type Writer = LineSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Owns the writer thread; dropping it writes out what is buffered and stops the thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread over `out`.
pub fn spawn(
    out: Box<dyn Write + Send>,
    max_lines: usize,
    max_bytes: usize,
) -> io::Result<(LineSink, Flusher)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        max_lines: max_lines.max(1),
        max_bytes: max_bytes.max(1),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_batches(&worker, out))?;
    Ok((
        LineSink(shared.clone()),
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    loop {
        let mut p = shared.lock();
        while p.bytes.is_empty() && !p.closed {
            p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.bytes.is_empty() {
            return; // closed, nothing left
        }
        if !p.closed {
            drop(p);
            std::thread::sleep(BATCH_DELAY);
            p = shared.lock();
        }
        std::mem::swap(&mut p.bytes, &mut batch);
        p.lines = 0;
        drop(p);
        // Nowhere to report a failed stdout: the lines are lost, as they would be unbuffered.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 1 << 20 {
            batch = Vec::new(); // a burst's buffer is not kept for ever
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that hands each batch to the test and can be held shut.
    struct Probe {
        batches: mpsc::Sender<Vec<u8>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Probe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            let _ = self.batches.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// One line in one `write`, as tracing's formatter sends it.
    fn line(sink: &LineSink, text: String) {
        sink.clone()
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    type Probe3 = (
        Box<dyn Write + Send>,
        mpsc::Receiver<Vec<u8>>,
        Arc<Mutex<()>>,
    );

    fn probe() -> Probe3 {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Mutex::new(()));
        let sink = Probe {
            batches: tx,
            gate: gate.clone(),
        };
        (Box::new(sink), rx, gate)
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_drop_writes_the_rest() {
        let (out, rx, _gate) = probe();
        let (sink, flusher) = spawn(out, 1000, 1 << 20).unwrap();
        for i in 0..500 {
            line(&sink, format!("line {i}"));
        }
        drop(flusher);
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(all).unwrap();
        let want: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            text, want,
            "every line, once, in order, written by the time drop returns"
        );
        assert_eq!(sink.dropped(), 0);
        line(&sink, "after close".to_string());
        assert_eq!(
            sink.dropped(),
            1,
            "a line after shutdown is counted, not kept"
        );
    }

    #[test]
    fn a_stuck_stdout_never_blocks_a_writer_and_bounds_what_waits() {
        let (out, rx, gate) = probe();
        let held = gate.lock().unwrap();
        let (sink, flusher) = spawn(out, 10, 1 << 20).unwrap();
        line(&sink, "first".to_string());
        // The writer thread takes "first" and blocks on the held stdout.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().lines != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "writer never took the batch"
            );
            std::thread::yield_now();
        }
        for i in 0..25 {
            line(&sink, format!("queued {i}"));
        }
        assert_eq!(
            sink.dropped(),
            15,
            "10 lines wait, the other 15 are dropped and counted"
        );
        drop(held);
        drop(flusher);
        let text = String::from_utf8(rx.try_iter().flatten().collect()).unwrap();
        assert!(text.starts_with("first\nqueued 0\n"), "{text}");
        assert!(text.ends_with("queued 9\n"), "{text}");

        let (out, _rx, _gate) = probe();
        let (sink, _flusher) = spawn(out, 1000, 64).unwrap();
        line(&sink, "x".repeat(100));
        assert_eq!(sink.dropped(), 1, "a line over the byte bound is dropped");
    }
}
