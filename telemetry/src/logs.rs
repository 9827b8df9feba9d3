//! Log lines on stdout, text or JSON, each with the node id and (inside a traced request) the
//! trace id. A background thread writes them in batches ([`crate::writer`]): a request never
//! waits for stdout. When stdout cannot keep up, new lines are dropped past `log_buffer_lines`
//! (or that many KiB) and counted.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, TelemetryConfig};
use crate::writer::{self, Flusher, LineSink};

/// Keeps the writer thread; dropping it writes out what is buffered.
pub struct Guard {
    _flusher: Flusher,
    sink: LineSink,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("dropped", &self.sink.dropped())
            .finish()
    }
}

impl Guard {
    /// A handle on the count of dropped lines, for metrics.
    pub fn drops(&self) -> LogDrops {
        LogDrops(self.sink.clone())
    }
}

/// Log lines dropped because stdout could not keep up (the writer never blocks).
#[derive(Clone)]
pub struct LogDrops(LineSink);

impl LogDrops {
    pub fn count(&self) -> u64 {
        self.0.dropped()
    }
}

impl fmt::Debug for LogDrops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogDrops({})", self.count())
    }
}

pub fn init(config: &TelemetryConfig, node: &str, default_level: &str) -> anyhow::Result<Guard> {
    let level = config.log_level.as_deref().unwrap_or(default_level);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .map_err(|e| anyhow::anyhow!("telemetry.log_level: {e}"))?;
    let lines = config.log_buffer_lines;
    let (writer, flusher) = writer::spawn(
        Box::new(std::io::stdout()),
        lines,
        lines.saturating_mul(1024),
    )
    .map_err(|e| anyhow::anyhow!("cannot start the log writer thread: {e}"))?;
    crate::access::install(writer.clone(), node, config.format() == LogFormat::Json);
    let node = node.to_owned();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    let result = match config.format() {
        LogFormat::Json => builder
            .event_format(Tagged {
                inner: tracing_subscriber::fmt::format().json(),
                node,
                json: true,
            })
            .try_init(),
        LogFormat::Text => builder
            .event_format(Tagged {
                inner: tracing_subscriber::fmt::format(),
                node,
                json: false,
            })
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    Ok(Guard {
        _flusher: flusher,
        sink: writer,
    })
}

/// Adds `node` and, inside a traced request, `trace_id` to each line of `inner`.
struct Tagged<F> {
    inner: F,
    node: String,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for Tagged<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let trace = crate::traces::current_trace_id();
        if self.json {
            // `{"timestamp":...}` becomes `{"node":"..","trace_id":"..","timestamp":...}`.
            let rest = line.strip_prefix('{').unwrap_or(&line);
            write!(
                writer,
                "{{\"node\":{}",
                serde_json::Value::from(self.node.as_str())
            )?;
            if let Some(t) = trace {
                write!(writer, ",\"trace_id\":\"{t}\"")?;
            }
            if rest.starts_with('}') {
                writer.write_str(rest)
            } else {
                write!(writer, ",{rest}")
            }
        } else {
            let body = line.trim_end_matches('\n');
            write!(writer, "{body} node={}", self.node)?;
            if let Some(t) = trace {
                write!(writer, " trace_id={t}")?;
            }
            writeln!(writer)
        }
    }
}
