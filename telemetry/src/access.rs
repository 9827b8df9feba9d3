//! The access log: one line per request, in the same text or JSON shape as every other log
//! line, but built by hand into one buffer and handed straight to the log writer. Through
//! tracing's formatter (a visitor per field, `fmt` machinery, styling) the line cost about 19k
//! instructions a request, a fifth of the proxy's whole per-request work; this costs a tenth.
//!
//! It obeys the same filter as the rest (`RUST_LOG`, `telemetry.log_level`: `access=off` or
//! `warn` silence it) and carries the node id; the caller adds `trace_id` as a field.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::writer::LineSink;

struct Output {
    sink: LineSink,
    node: String,
    json: bool,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Called once by the log setup.
pub(crate) fn install(sink: LineSink, node: &str, json: bool) {
    let _ = OUTPUT.set(Output {
        sink,
        node: node.to_owned(),
        json,
    });
}

/// A line for target `access` at level INFO with `message`, or `None` when the filter turns
/// that target off or logging is not set up. Add fields, then [`Line::emit`].
pub fn line(message: &str) -> Option<Line> {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return None;
    }
    let out = OUTPUT.get()?;
    let mut buf = Vec::with_capacity(384);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if out.json {
        buf.extend_from_slice(b"{\"node\":");
        json_str(&mut buf, &out.node);
        buf.extend_from_slice(b",\"timestamp\":\"");
        timestamp(&mut buf, now);
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":");
        json_str(&mut buf, message);
    } else {
        timestamp(&mut buf, now);
        buf.extend_from_slice(b"  INFO access: ");
        buf.extend_from_slice(message.as_bytes());
    }
    Some(Line { buf, out })
}

/// An access line being built; see [`line`].
pub struct Line {
    buf: Vec<u8>,
    out: &'static Output,
}

impl Line {
    fn key(&mut self, key: &str) {
        if self.out.json {
            self.buf.extend_from_slice(b",\"");
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.extend_from_slice(b"\":");
        } else {
            self.buf.push(b' ');
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.push(b'=');
        }
    }

    /// A string field. In text lines a value that is not plainly safe (spaces, quotes, `=`,
    /// control or non-ASCII characters, empty) is quoted and escaped, so a client-chosen value
    /// can neither forge a field nor break the line.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        if self.out.json {
            json_str(&mut self.buf, value);
        } else {
            text_value(&mut self.buf, value);
        }
        self
    }

    /// An unsigned integer field.
    pub fn uint(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// A duration as milliseconds with three decimals (`12.345`).
    pub fn millis(&mut self, key: &str, value: Duration) -> &mut Self {
        self.key(key);
        let us = value.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
        let frac = us % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        self
    }

    /// Ends the line and queues it for the writer thread (never blocks; dropped and counted
    /// when the writer is behind).
    pub fn emit(mut self) {
        if self.out.json {
            self.buf.extend_from_slice(b"},\"target\":\"access\"}\n");
        } else {
            self.buf.extend_from_slice(b" node=");
            text_value(&mut self.buf, &self.out.node);
            self.buf.push(b'\n');
        }
        self.out.sink.push(&self.buf);
    }
}

/// A value in a text line: as it is when plainly safe, else quoted and escaped.
fn text_value(buf: &mut Vec<u8>, value: &str) {
    if !value.is_empty() && value.bytes().all(plain) {
        buf.extend_from_slice(value.as_bytes());
    } else {
        let _ = write!(buf, "{value:?}");
    }
}

/// Bytes a text value may hold unquoted.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:/[]@%+*?&~,;!$'()#^|<>{}".contains(&b)
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// `2026-12-02T07:42:18.914791Z`, UTC, as tracing writes it.
fn timestamp(buf: &mut Vec<u8>, since_epoch: Duration) {
    let secs = since_epoch.as_secs();
    let (y, m, d) = civil_date((secs / 86_400) as i64);
    let t = secs % 86_400;
    let two = |buf: &mut Vec<u8>, n: u64| {
        buf.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8])
    };
    buf.extend_from_slice(itoa::Buffer::new().format(y).as_bytes());
    buf.push(b'-');
    two(buf, m);
    buf.push(b'-');
    two(buf, d);
    buf.push(b'T');
    two(buf, t / 3600);
    buf.push(b':');
    two(buf, t / 60 % 60);
    buf.push(b':');
    two(buf, t % 60);
    buf.push(b'.');
    let us = u64::from(since_epoch.subsec_micros());
    let mut digits = [b'0'; 6];
    let mut n = us;
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// Year, month, day of a count of days since 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_date(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut b = Vec::new();
        timestamp(&mut b, Duration::new(secs, micros * 1000));
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn timestamps_match_gnu_date() {
        // Expected values from `date -u -d @<secs> +%Y-%m-%dT%H:%M:%S.%6NZ`.
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(stamp(1_795_000_000, 123_456), "2026-11-18T11:06:40.123456Z");
        assert_eq!(stamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(stamp(4_107_542_400, 999_999), "2100-03-01T00:00:00.999999Z");
        assert_eq!(stamp(951_868_799, 0), "2000-02-29T23:59:59.000000Z");
    }

    fn built(json: bool, f: impl FnOnce(&mut Line)) -> String {
        let (sink, _flusher) =
            crate::writer::spawn(Box::new(std::io::sink()), 10, 1 << 16).unwrap();
        let out = Box::leak(Box::new(Output {
            sink,
            node: "n1".into(),
            json,
        }));
        let mut line = Line {
            buf: Vec::new(),
            out,
        };
        f(&mut line);
        String::from_utf8(line.buf).unwrap()
    }

    #[test]
    fn hostile_values_cannot_forge_fields_or_break_lines() {
        let text = built(false, |l| {
            l.str("path", "/mcp")
                .str("m", "tools/call x=1\nfake=2")
                .str("e", "");
        });
        assert_eq!(text, r#" path=/mcp m="tools/call x=1\nfake=2" e="""#);
        let json = built(true, |l| {
            l.str("m", "a\"b\n")
                .uint("n", 42)
                .millis("d", Duration::from_micros(12_345));
        });
        assert_eq!(json, r#","m":"a\"b\n","n":42,"d":12.345"#);
        let ms = built(false, |l| {
            l.millis("d", Duration::from_nanos(1_500))
                .millis("e", Duration::from_secs(3));
        });
        assert_eq!(ms, " d=0.001 e=3000.000");
    }
}
