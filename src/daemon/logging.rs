//! Logging setup: `tracing` to stderr only (journald or the terminal collects it; no log files).
//!
//! * Format: human-readable when stderr is a terminal, one JSON object per line otherwise (under
//!   systemd, in pipes, in CI); `--log-format human|json` overrides.
//! * Under systemd (stderr is the journal stream named by `$JOURNAL_STREAM`), every line starts
//!   with its syslog priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace), which
//!   journald takes for the entry's priority and strips (`SyslogLevelPrefix=`, on by default): so
//!   `journalctl -p warning -u tinyscheduler` shows the warnings and errors.
//! * Level: `--log-level` / `TINYSCHEDULER_LOG_LEVEL`, default `info` for `run --daemon` and
//!   `warn` for every other command (see `cli::main`). Accepts `RUST_LOG`-style
//!   filters (`info,tinyscheduler::controllers=debug`) and the Python-era names `DEBUG`, `INFO`,
//!   `WARNING`, `ERROR`, `CRITICAL` in any case (`WARNING` → `warn`, `CRITICAL` → `error`).
//!
//! **Convention:** every log line about an object carries `kind` and `name` fields, so that one
//! filter finds everything about it:
//!
//! ```ignore
//! tracing::info!(kind = "Task", name = %task, agent = %agent, "assigned");
//! tracing::warn!(kind = "Lease", name = %lease, pid, "process gone; reclaiming");
//! ```
//!
//! In JSON these are top-level keys: `{"timestamp":…,"level":"INFO","kind":"Task","name":"fix-login",
//! "agent":"vaela","message":"assigned","target":"tinyscheduler::controllers::assignment"}`.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsRawFd;

use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Aligned, coloured text for people at a terminal.
    Human,
    /// One JSON object per line, for journald, `jq` and log shippers.
    Json,
}

impl LogFormat {
    /// The name `--log-format` takes.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }

    /// Human on a terminal, JSON otherwise.
    pub fn detect() -> LogFormat {
        if std::io::stderr().is_terminal() {
            LogFormat::Human
        } else {
            LogFormat::Json
        }
    }
}

/// The default level filter.
pub const DEFAULT_LEVEL: &str = "info";

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// Turns a level or `RUST_LOG`-style filter into a filter string `EnvFilter` understands,
/// mapping Python-era level names, and refusing a lone word that is no level (which `EnvFilter`
/// would silently read as "everything from the module named so").
pub fn normalize_level(spec: &str) -> Result<String, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(DEFAULT_LEVEL.to_string());
    }
    let mut out = Vec::new();
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, directive),
        };
        let mapped = match level.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_string(),
            "critical" | "fatal" => "error".to_string(),
            l if LEVELS.contains(&l) => l.to_string(),
            // `target=` with a level that is a number (tracing accepts 0-5) or the like.
            _ if target.is_some() => level.to_string(),
            // A bare module path means "everything in it"; allowed only when it is plainly a
            // path (`tinyscheduler::store`). Write `tinyscheduler=trace` for a whole crate.
            _ if level.contains("::") => level.to_string(),
            _ => {
                return Err(format!(
                    "invalid log level {level:?}: want one of error, warn, info, debug, trace, off \
                     (or DEBUG/INFO/WARNING/ERROR), or a filter such as \
                     \"info,tinyscheduler::controllers=debug\""
                ))
            }
        };
        out.push(match target {
            Some(t) => format!("{t}={mapped}"),
            None => mapped,
        });
    }
    Ok(out.join(","))
}

/// Parses a level or filter (see [`normalize_level`]) into an `EnvFilter`.
pub fn parse_filter(spec: &str) -> Result<EnvFilter, String> {
    let normalized = normalize_level(spec)?;
    EnvFilter::builder()
        .parse(&normalized)
        .map_err(|e| format!("invalid log level {spec:?}: {e}"))
}

/// A subscriber writing to `writer` in `format`, filtered by `filter`. [`init_logging`] installs
/// one over stderr; tests build one over a buffer.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Human => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Installs the process-wide logger: `format` (default: [`LogFormat::detect`]) at `level`
/// (default `info`; `cli::main` passes `warn` for commands other than `run --daemon`) on stderr, each line prefixed with its priority when stderr is the journal.
/// Fails on an invalid level, or when a logger is already installed.
pub fn init_logging(format: Option<LogFormat>, level: Option<&str>) -> Result<(), String> {
    let filter = parse_filter(level.unwrap_or(DEFAULT_LEVEL))?;
    let format = format.unwrap_or_else(LogFormat::detect);
    let ansi = format == LogFormat::Human && std::io::stderr().is_terminal();
    let sub = if on_journal() {
        subscriber(format, filter, WithPriority(std::io::stderr), ansi)
    } else {
        subscriber(format, filter, std::io::stderr, ansi)
    };
    tracing::subscriber::set_global_default(sub)
        .map_err(|e| format!("could not install the logger: {e}"))
}

/// Prints the error that ends the program on stderr; on the journal each line is marked an error
/// (`<3>`), so that `journalctl -p err` finds a scheduler that could not start.
pub fn print_error(text: &str) {
    let error = String::from_utf8_lossy(priority(&Level::ERROR));
    eprintln!(
        "{}",
        with_priority_lines(text, on_journal().then_some(&error))
    );
}

/// Whether this process's stderr is the journal (see [`stderr_is_journal`]).
fn on_journal() -> bool {
    stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref())
}

/// `text` with `prefix` before each of its lines.
fn with_priority_lines(text: &str, prefix: Option<&str>) -> String {
    match prefix {
        None => text.to_string(),
        Some(p) => text
            .lines()
            .map(|l| format!("{p}{l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Whether stderr is the journal stream systemd names in `JOURNAL_STREAM` (`DEVICE:INODE`, as
/// systemd.exec(5) says to check: a redirected stderr is not the journal any more).
fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|s| s.trim().split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(io::stderr().as_raw_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// The syslog priority journald reads from a line's `<N>` prefix.
fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        _ => b"<7>",
    }
}

/// A [`MakeWriter`] whose lines start with their event's syslog priority (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct WithPriority<M>(pub M);

/// One event's writer: the priority goes out with the event's first write, in the same call.
pub struct Prioritized<W> {
    prefix: Option<&'static [u8]>,
    inner: W,
}

impl<W: Write> Write for Prioritized<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.prefix.take() {
            Some(p) => {
                // One write of prefix and line, so that lines of two threads never interleave.
                let mut line = Vec::with_capacity(p.len() + buf.len());
                line.extend_from_slice(p);
                line.extend_from_slice(buf);
                self.inner.write_all(&line)?;
                Ok(buf.len())
            }
            None => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for WithPriority<M> {
    type Writer = Prioritized<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Prioritized {
            prefix: None,
            inner: self.0.make_writer(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Prioritized {
            prefix: Some(priority(meta.level())),
            inner: self.0.make_writer_for(meta),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn python_level_names_are_accepted_in_any_case() {
        assert_eq!(normalize_level("DEBUG").unwrap(), "debug");
        assert_eq!(normalize_level("Info").unwrap(), "info");
        assert_eq!(normalize_level("WARNING").unwrap(), "warn");
        assert_eq!(normalize_level("error").unwrap(), "error");
        assert_eq!(normalize_level("CRITICAL").unwrap(), "error");
        assert_eq!(normalize_level("").unwrap(), "info");
    }

    #[test]
    fn rust_log_style_filters_pass_through_with_levels_mapped() {
        assert_eq!(
            normalize_level("info,tinyscheduler::controllers=WARNING").unwrap(),
            "info,tinyscheduler::controllers=warn"
        );
        assert_eq!(
            normalize_level("tinyscheduler::store").unwrap(),
            "tinyscheduler::store"
        );
        assert!(parse_filter("warn,hyper=off").is_ok());
    }

    #[test]
    fn an_unknown_bare_level_is_an_error_not_a_module_name() {
        let e = normalize_level("verbose").unwrap_err();
        assert!(e.contains("invalid log level \"verbose\""), "{e}");
        assert!(parse_filter("noisy").is_err());
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn under_the_journal_each_line_starts_with_its_events_priority() {
        let buf = Buf::default();
        let sub = subscriber(
            LogFormat::Json,
            parse_filter("debug").unwrap(),
            WithPriority(buf.clone()),
            false,
        );
        tracing::subscriber::with_default(sub, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{text}");
        for l in text.lines() {
            assert!(
                l[3..].starts_with('{'),
                "one JSON object after the prefix: {l}"
            );
        }
    }

    #[test]
    fn stderr_is_the_journal_only_when_journal_stream_names_it() {
        let st = nix::sys::stat::fstat(io::stderr().as_raw_fd()).unwrap();
        let mine = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(&mine)));
        assert!(!stderr_is_journal(Some(&format!(
            "{}:{}",
            st.st_dev,
            st.st_ino + 1
        ))));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(None));
    }

    #[test]
    fn json_lines_carry_kind_and_name_as_top_level_fields() {
        let buf = Buf::default();
        let sub = subscriber(
            LogFormat::Json,
            parse_filter("INFO").unwrap(),
            buf.clone(),
            false,
        );
        tracing::subscriber::with_default(sub, || {
            tracing::info!(kind = "Task", name = "fix-login", "assigned");
            tracing::debug!(kind = "Task", name = "hidden", "filtered out");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["kind"], "Task");
        assert_eq!(lines[0]["name"], "fix-login");
        assert_eq!(lines[0]["message"], "assigned");
        assert!(lines[0]["timestamp"].is_string());
    }

    #[test]
    fn human_lines_are_plain_text_without_colour_when_asked() {
        let buf = Buf::default();
        let sub = subscriber(
            LogFormat::Human,
            parse_filter("warning").unwrap(),
            buf.clone(),
            false,
        );
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(kind = "Lease", name = "x", "stale");
            tracing::info!("not shown");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("WARN"), "{out}");
        assert!(out.contains("kind=\"Lease\""), "{out}");
        assert!(!out.contains('\x1b'), "{out}");
    }
}
