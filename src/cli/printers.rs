//! Output formats shared by `get`, `describe` and `wait`: kubectl-style tables (columns padded by
//! 3), `-o wide|yaml|json|name`, and the printer columns of each kind.

use std::io::{self, Write};
use std::time::SystemTime;

use serde::Serialize;

use super::CliError;
use crate::resources::meta::{format_age, parse_time, Resource, GROUP};
use crate::resources::{Agent, Event, Kind, Lease, Queue, Task};

/// Space between table columns, as kubectl's tabwriter.
pub const PADDING: usize = 3;

/// How `get` prints objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
}

impl Format {
    /// Parses `-o`.
    pub fn parse(o: Option<&str>) -> Result<Format, CliError> {
        Ok(match o {
            None | Some("") => Format::Table,
            Some("wide") => Format::Wide,
            Some("yaml") => Format::Yaml,
            Some("json") => Format::Json,
            Some("name") => Format::Name,
            Some(other) => {
                return Err(CliError(format!(
                    "error: unable to match a printer suitable for the output format {other:?}, \
                     allowed formats are: json, name, wide, yaml"
                )))
            }
        })
    }

    pub fn is_table(self) -> bool {
        matches!(self, Format::Table | Format::Wide)
    }
}

/// A table: headers, rows, and column widths computed from both.
pub struct Table {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: Vec<&'static str>) -> Table {
        Table {
            headers,
            rows: Vec::new(),
        }
    }

    /// Column widths over headers (unless omitted) and rows.
    pub fn widths(&self, headers: bool) -> Vec<usize> {
        let mut w: Vec<usize> = if headers {
            self.headers.iter().map(|h| h.chars().count()).collect()
        } else {
            vec![0; self.headers.len()]
        };
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(escape_controls(c).chars().count());
                }
            }
        }
        w
    }

    /// Writes the table (header line unless `no_headers`).
    pub fn write(&self, out: &mut impl Write, no_headers: bool) -> io::Result<()> {
        let widths = self.widths(!no_headers);
        let mut line = String::new();
        if !no_headers {
            write_row(&mut line, self.headers.iter().copied(), &widths);
            out.write_all(line.as_bytes())?;
        }
        for r in &self.rows {
            line.clear();
            write_row(&mut line, r.iter().map(String::as_str), &widths);
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

/// Appends one padded row and a newline to `line`; the last cell is not padded.
pub fn write_row<'a>(line: &mut String, cells: impl Iterator<Item = &'a str>, widths: &[usize]) {
    let cells: Vec<&str> = cells.collect();
    let n = cells.len();
    for (i, c) in cells.into_iter().enumerate() {
        let c = escape_controls(c);
        line.push_str(&c);
        if i + 1 < n {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = w.saturating_sub(c.chars().count()) + PADDING;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    line.push('\n');
}

/// `text` with every control character written out (`\n`, `\t`, `\r`, else `\u{1b}`): a
/// value from a manifest or a tinytask server could otherwise start another row of a table, or
/// send escape sequences to the terminal. `-o json|yaml` print values as they are.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `task.tinyscheduler.io/x`.
pub fn resource_name(kind: Kind, name: &str) -> String {
    format!("{}.{GROUP}/{name}", kind.singular())
}

/// `<none>` for absent values, as kubectl.
fn or_none(v: Option<&str>) -> String {
    match v {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "<none>".to_string(),
    }
}

fn age(ts: Option<&str>, now: SystemTime) -> String {
    format_age(ts.and_then(parse_time), now)
}

/// Quotes an argv for display the way a shell would read it back.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%{}".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A kind `get` can print as a table.
pub trait Printable: Resource {
    const KIND_ENUM: Kind;
    fn columns(wide: bool) -> Vec<&'static str>;
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String>;
    /// The order of a list (by name unless the kind says otherwise).
    fn sort(items: &mut [Self]) {
        let _ = items;
    }
}

impl Printable for Agent {
    const KIND_ENUM: Kind = Kind::Agent;
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec!["NAME", "QUEUE", "RUNNING", "LIMIT", "AGE"];
        if wide {
            c.extend(["PAUSED", "FREE", "COMMAND"]);
        }
        c
    }
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String> {
        // Counts no scheduler has written yet are not zero but unknown.
        let seen = self.status.observed_generation.is_some();
        let mut r = vec![
            self.metadata.name.clone(),
            or_none(self.spec.queue.as_deref()),
            counted(seen, self.status.active_leases),
            self.spec.max_concurrency.to_string(),
            age(self.metadata.creation_timestamp.as_deref(), now),
        ];
        if wide {
            r.push(self.spec.paused.to_string());
            r.push(counted(seen, self.status.free_slots));
            r.push(if self.spec.command.is_empty() {
                "<goose default>".to_string()
            } else {
                shell_join(&self.spec.command)
            });
        }
        r
    }
}

/// What a status column shows before any scheduler has written the status (kubectl's word).
const UNKNOWN: &str = "<unknown>";

/// A status count, or [`UNKNOWN`] while no scheduler has observed the object (`seen`).
fn counted(seen: bool, n: i64) -> String {
    if seen {
        n.to_string()
    } else {
        UNKNOWN.to_string()
    }
}

impl Printable for Queue {
    const KIND_ENUM: Kind = Kind::Queue;
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec!["NAME", "SOURCE", "PENDING", "RUNNING", "AGE"];
        if wide {
            c.extend(["BLOCKED", "SUCCEEDED", "FAILED", "CAPACITY", "AGENTS"]);
        }
        c
    }
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String> {
        let source = match self.spec.source {
            crate::resources::QueueSource::Local => "local",
            crate::resources::QueueSource::Tinytask => "tinytask",
        };
        let seen = self.status.observed_generation.is_some();
        let mut r = vec![
            self.metadata.name.clone(),
            source.to_string(),
            counted(seen, self.status.pending),
            counted(seen, self.status.running),
            age(self.metadata.creation_timestamp.as_deref(), now),
        ];
        if wide {
            r.push(counted(seen, self.status.blocked));
            r.push(counted(seen, self.status.succeeded));
            r.push(counted(seen, self.status.failed));
            r.push(counted(seen, self.status.capacity));
            r.push(if !seen {
                UNKNOWN.into()
            } else if self.status.agents.is_empty() {
                "<none>".into()
            } else {
                self.status.agents.join(",")
            });
        }
        r
    }
}

impl Printable for Task {
    const KIND_ENUM: Kind = Kind::Task;
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec![
            "NAME", "QUEUE", "PHASE", "AGENT", "PRIORITY", "ATTEMPTS", "AGE",
        ];
        if wide {
            c.extend(["BLOCKED-BY", "LEASE", "EXIT-CODE"]);
        }
        c
    }
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String> {
        let agent = self
            .status
            .agent
            .as_deref()
            .or(self.spec.assigned_to.as_deref());
        let mut r = vec![
            self.metadata.name.clone(),
            or_none(self.spec.queue.as_deref()),
            self.status.phase.as_str().to_string(),
            or_none(agent),
            self.spec.priority.to_string(),
            self.status.attempts.to_string(),
            age(self.metadata.creation_timestamp.as_deref(), now),
        ];
        if wide {
            r.push(if self.spec.blocked_by.is_empty() {
                "<none>".into()
            } else {
                self.spec.blocked_by.join(",")
            });
            r.push(or_none(self.status.lease.as_deref()));
            r.push(
                self.status
                    .exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "<none>".into()),
            );
        }
        r
    }
}

impl Printable for Lease {
    const KIND_ENUM: Kind = Kind::Lease;
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec!["NAME", "TASK", "AGENT", "PID", "HEARTBEAT", "AGE"];
        if wide {
            c.extend(["PHASE", "ATTEMPT", "HOST", "EXIT-CODE"]);
        }
        c
    }
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String> {
        let mut r = vec![
            self.metadata.name.clone(),
            self.spec.task.clone(),
            self.spec.agent.clone(),
            self.status
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "<none>".into()),
            match self.status.renew_time.as_deref() {
                Some(t) => age(Some(t), now),
                None => "<none>".into(),
            },
            age(self.metadata.creation_timestamp.as_deref(), now),
        ];
        if wide {
            r.push(format!("{:?}", self.status.phase));
            r.push(self.spec.attempt.to_string());
            r.push(or_none(self.status.host.as_deref()));
            r.push(match (self.status.exit_code, self.status.signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(s)) => format!("signal {s}"),
                _ => "<none>".into(),
            });
        }
        r
    }
}

impl Printable for Event {
    const KIND_ENUM: Kind = Kind::Event;
    fn columns(wide: bool) -> Vec<&'static str> {
        let mut c = vec!["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"];
        if wide {
            c.extend(["SOURCE", "COUNT", "FIRST SEEN"]);
        }
        c
    }
    fn row(&self, now: SystemTime, wide: bool) -> Vec<String> {
        let s = &self.spec;
        let object = match Kind::from_kind_field(&s.involved_object.kind) {
            Some(k) => format!("{}/{}", k.singular(), s.involved_object.name),
            None => format!(
                "{}/{}",
                s.involved_object.kind.to_ascii_lowercase(),
                s.involved_object.name
            ),
        };
        let mut r = vec![
            age(Some(&s.last_timestamp), now),
            format!("{:?}", s.type_),
            s.reason.clone(),
            object,
            s.message.clone(),
        ];
        if wide {
            r.push(or_none(Some(&s.source)));
            r.push(s.count.to_string());
            r.push(age(Some(&s.first_timestamp), now));
        }
        r
    }
    fn sort(items: &mut [Self]) {
        // Oldest first, newest last, like `kubectl get events --sort-by=.lastTimestamp`.
        items.sort_by(|a, b| {
            let ta = parse_time(&a.spec.last_timestamp);
            let tb = parse_time(&b.spec.last_timestamp);
            ta.cmp(&tb).then_with(|| a.revision().cmp(&b.revision())) // same second: write order
        });
    }
}

/// The `kind: List` envelope `-o json|yaml` prints for several objects.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListEnvelope<'a, T: Serialize> {
    api_version: &'static str,
    kind: &'static str,
    items: &'a [T],
}

/// Writes objects as JSON: one object alone when `single`, else a `List`.
pub fn write_json<T: Serialize>(out: &mut impl Write, items: &[T], single: bool) -> io::Result<()> {
    if single && items.len() == 1 {
        serde_json::to_writer_pretty(&mut *out, &items[0])?;
    } else {
        let list = ListEnvelope {
            api_version: "v1",
            kind: "List",
            items,
        };
        serde_json::to_writer_pretty(&mut *out, &list)?;
    }
    out.write_all(b"\n")
}

/// Writes objects as YAML: one object alone when `single`, else a `List`.
pub fn write_yaml<T: Serialize>(out: &mut impl Write, items: &[T], single: bool) -> io::Result<()> {
    let text = if single && items.len() == 1 {
        serde_saphyr::to_string(&items[0])
    } else {
        serde_saphyr::to_string(&ListEnvelope {
            api_version: "v1",
            kind: "List",
            items,
        })
    }
    .map_err(|e| io::Error::other(e.to_string()))?;
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Writes `kind.group/name` lines.
pub fn write_names<K: Printable>(out: &mut impl Write, items: &[K]) -> io::Result<()> {
    for o in items {
        writeln!(out, "{}", resource_name(K::KIND_ENUM, o.name()))?;
    }
    Ok(())
}

/// Runs `f` against a buffered stdout; a closed pipe (`| head`) ends output quietly.
pub fn with_stdout(
    f: impl FnOnce(&mut io::BufWriter<io::StdoutLock>) -> io::Result<()>,
) -> Result<(), CliError> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let r = f(&mut out).and_then(|_| out.flush());
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError(format!("error: writing output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_by_three_and_the_last_is_not_padded() {
        let mut t = Table::new(vec!["NAME", "AGE"]);
        t.rows.push(vec!["a-long-name".into(), "5s".into()]);
        t.rows.push(vec!["b".into(), "10m".into()]);
        let mut out = Vec::new();
        t.write(&mut out, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME          AGE\na-long-name   5s\nb             10m\n"
        );
    }

    #[test]
    fn argv_is_shown_as_a_shell_would_read_it() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo 'hi' there".into()];
        assert_eq!(shell_join(&argv), r#"sh -c 'echo '\''hi'\'' there'"#);
    }
}
