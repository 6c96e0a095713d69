//! Log capture: splitting a step's output into lines, masking secrets, and writing the result to
//! the Store in batches while an observer (the terminal, later a live stream) sees it too.

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use skiff_core::run::{LogChunk, StepRecord};

use crate::record::Recorder;
use tokio::sync::mpsc;

/// What replaces a secret in the log.
pub const MASK: &[u8] = b"***";
/// Secret lines shorter than this are not masked: masking `a` would blank out the whole log.
pub const MIN_SECRET_LEN: usize = 3;
/// A line longer than this is passed on in pieces instead of being held whole.
const MAX_PENDING: usize = 64 << 10;

/// Replaces every secret in the text it is given. Secrets are matched line by line (a secret
/// holding newlines is masked line by line), so a match never crosses a line end.
#[derive(Clone, Default)]
pub struct Masker {
    matcher: Option<Arc<AhoCorasick>>,
    longest: usize,
}

impl Masker {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<&str> = secrets
            .into_iter()
            .flat_map(str::lines)
            .map(str::trim)
            .filter(|l| l.len() >= MIN_SECRET_LEN)
            .collect();
        patterns.sort_unstable();
        patterns.dedup();
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&patterns)
                .ok()
                .map(Arc::new)
        };
        Masker { matcher, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// Appends `text` with its secrets masked to `out`.
    pub fn mask_into(&self, text: &[u8], out: &mut Vec<u8>) {
        let Some(m) = &self.matcher else {
            out.extend_from_slice(text);
            return;
        };
        let mut last = 0;
        for hit in m.find_iter(text) {
            out.extend_from_slice(&text[last..hit.start()]);
            out.extend_from_slice(MASK);
            last = hit.end();
        }
        out.extend_from_slice(&text[last..]);
    }

    pub fn mask_str(&self, text: &str) -> String {
        let mut out = Vec::with_capacity(text.len());
        self.mask_into(text.as_bytes(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Where a long line may be cut: at most `len - (longest - 1)`, between two characters (a
    /// piece is stored and decoded on its own), and moved back to the start of a match that
    /// would straddle the cut, so that no secret is split.
    fn safe_cut(&self, pending: &[u8]) -> usize {
        let longest = self.longest.saturating_sub(1);
        let mut cut = skiff_core::utf8::cut_at_char(pending, pending.len().saturating_sub(longest));
        let Some(m) = &self.matcher else {
            return cut;
        };
        for hit in m.find_iter(pending) {
            if hit.start() < cut && hit.end() > cut {
                cut = hit.start();
            }
        }
        cut
    }
}

/// Turns a byte stream into masked output, passing on only complete lines (and very long lines
/// in safe pieces), so a secret split across two reads is still masked.
pub struct LineSplitter {
    masker: Masker,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(masker: Masker) -> Self {
        LineSplitter {
            masker,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; appends what is ready to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.pending.is_empty() {
            // Fast path: no carried-over bytes, so complete lines go straight from `data`.
            match memchr::memrchr(b'\n', data) {
                Some(end) => {
                    self.masker.mask_into(&data[..=end], out);
                    self.pending.extend_from_slice(&data[end + 1..]);
                }
                None => self.pending.extend_from_slice(data),
            }
        } else {
            self.pending.extend_from_slice(data);
            if let Some(end) = memchr::memrchr(b'\n', &self.pending) {
                self.masker.mask_into(&self.pending[..=end], out);
                self.pending.drain(..=end);
            }
        }
        if self.pending.len() > MAX_PENDING {
            let cut = self.masker.safe_cut(&self.pending);
            self.masker.mask_into(&self.pending[..cut], out);
            self.pending.drain(..cut);
        }
    }

    /// Passes on whatever is left at the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.masker.mask_into(&self.pending, out);
            out.push(b'\n');
            self.pending.clear();
        }
    }
}

/// Sees a run as it goes, in order: log output and step changes (the CLI prints them; the
/// server will stream them).
pub trait RunObserver: Send + Sync {
    fn log(&self, step: Option<u32>, data: &[u8]);
    fn step_changed(&self, _step: &StepRecord) {}
}

enum Event {
    Log(LogChunk),
    Step(Box<StepRecord>),
}

/// A handle for sending log bytes (and step changes, to keep them in order with the log) to the
/// writer task.
#[derive(Clone)]
pub struct LogSender {
    tx: mpsc::Sender<Event>,
    /// skiff's own lines pass the masker too (an action's message may hold a URL with a
    /// secret in it); step output is masked as it is read.
    masker: Masker,
}

impl LogSender {
    /// A step's output, as read now.
    pub async fn send(&self, step: Option<u32>, data: Vec<u8>) {
        self.chunk(LogChunk::output(step, data)).await;
    }

    async fn chunk(&self, chunk: LogChunk) {
        if chunk.data.is_empty() {
            return;
        }
        // The writer only stops after every sender is gone, so a send cannot fail while the run
        // is alive; if it does, the bytes have nowhere to go.
        let _ = self.tx.send(Event::Log(chunk)).await;
    }

    /// Tells the observer about a step change, after the log that came before it.
    pub async fn step_changed(&self, record: &StepRecord) {
        let _ = self.tx.send(Event::Step(Box::new(record.clone()))).await;
    }

    /// A line of output that did not come through a step's pipes (a build's, a push's),
    /// masked like the steps' output.
    pub async fn output_line(&self, step: Option<u32>, text: &str) {
        let mut data = if self.masker.is_empty() {
            text.as_bytes().to_vec()
        } else {
            self.masker.mask_str(text).into_bytes()
        };
        data.push(b'\n');
        self.chunk(LogChunk::output(step, data)).await;
    }

    /// A line from skiff itself (not from the step), marked so readers can tell it apart.
    pub async fn note(&self, step: Option<u32>, text: &str) {
        let text = if self.masker.is_empty() {
            std::borrow::Cow::Borrowed(text)
        } else {
            std::borrow::Cow::Owned(self.masker.mask_str(text))
        };
        let mut data = Vec::with_capacity(text.len() + 10);
        data.extend_from_slice(b"[skiff] ");
        data.extend_from_slice(text.as_bytes());
        data.push(b'\n');
        self.chunk(LogChunk::skiff(step, data)).await;
    }
}

/// How many chunks may wait for the writer: the bound on a run's log memory (with chunks of at
/// most 320 KiB, 5 MiB) and the back-pressure that slows a step only when the Store cannot keep up.
const CHANNEL_CHUNKS: usize = 16;
/// How long log output may wait to be written to the Store (observers see it at once): one
/// write per interval, not one per burst of output.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Chunks read closer together than this may be stored as one (their lines share its time).
const MERGE_WITHIN: chrono::TimeDelta = chrono::TimeDelta::milliseconds(10);
/// The largest log chunk stored as one piece.
const STORED_CHUNK_BYTES: usize = 512 << 10;
/// The most bytes written to the Store in one transaction.
const BATCH_BYTES: usize = 1 << 20;

/// Starts the writer task for a run's log. It ends when every sender is dropped, after writing
/// everything it was sent.
pub fn start_writer(
    rec: Recorder,
    observer: Arc<dyn RunObserver>,
    masker: Masker,
) -> (LogSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Event>(CHANNEL_CHUNKS);
    let handle = tokio::spawn(async move {
        let mut batch: Vec<LogChunk> = Vec::new();
        let mut bytes = 0usize;
        // When the pending batch must be written even if no more comes.
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            let flush_due = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                event = rx.recv() => event,
                () = flush_due => {
                    flush(&rec, &mut batch).await;
                    (bytes, flush_at) = (0, None);
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event {
                Event::Log(chunk) => {
                    observer.log(chunk.step, &chunk.data);
                    bytes += chunk.data.len();
                    // Neighbouring chunks of one step and stream, read within a few
                    // milliseconds, are stored as one (with the first one's time).
                    match batch.last_mut() {
                        Some(last)
                            if last.step == chunk.step
                                && last.stream == chunk.stream
                                && (chunk.at - last.at) < MERGE_WITHIN
                                && last.data.len() + chunk.data.len() <= STORED_CHUNK_BYTES =>
                        {
                            last.data.extend_from_slice(&chunk.data);
                        }
                        _ => batch.push(chunk),
                    }
                    flush_at.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_EVERY);
                }
                Event::Step(record) => observer.step_changed(&record),
            }
            if bytes >= BATCH_BYTES {
                flush(&rec, &mut batch).await;
                (bytes, flush_at) = (0, None);
            }
        }
        flush(&rec, &mut batch).await;
    });
    (LogSender { tx, masker }, handle)
}

/// Writes the batch (the recorder retries, or holds it back while the Store is away).
async fn flush(rec: &Recorder, batch: &mut Vec<LogChunk>) {
    rec.logs(batch).await;
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_split(masker: &Masker, pieces: &[&[u8]]) -> String {
        let mut s = LineSplitter::new(masker.clone());
        let mut out = Vec::new();
        for p in pieces {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn masks_across_read_boundaries() {
        let m = Masker::new(["hunter2-secret", "line one\nline two"]);
        let text = b"pw=hunter2-secret; more hunter2-secret\nline one and line two\n";
        let whole = run_split(&m, &[text]);
        assert_eq!(whole, "pw=***; more ***\n*** and ***\n");
        // Every split point gives the same result.
        for cut in 0..text.len() {
            assert_eq!(
                run_split(&m, &[&text[..cut], &text[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        // Byte by byte too.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(run_split(&m, &bytes), whole);
    }

    #[test]
    fn masks_inside_very_long_lines() {
        let m = Masker::new(["s3cr3t-value"]);
        let mut line = vec![b'x'; MAX_PENDING + 5];
        line.extend_from_slice(b"s3cr3t-value");
        line.extend_from_slice(&[b'y'; 100]);
        for cut in [MAX_PENDING, MAX_PENDING + 6, MAX_PENDING + 9] {
            let out = run_split(&m, &[&line[..cut], &line[cut..], b"\n"]);
            assert!(!out.contains("s3cr3t"), "cut at {cut}");
            assert!(out.contains("***"));
        }
    }

    #[test]
    fn short_secrets_are_not_masked_and_no_secrets_is_a_copy() {
        let m = Masker::new(["ab", ""]);
        assert!(m.is_empty());
        assert_eq!(run_split(&m, &[b"abc\npartial"]), "abc\npartial\n");
    }
}
