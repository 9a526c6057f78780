//! `get KIND [NAME...] [-o wide|yaml|json|name] [-l sel] [--no-headers] [-w]`: read-only listing.

use std::collections::HashMap;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::SystemTime;

use super::args::GetArgs;
use super::printers::{self, Format, Printable, Table};
use super::{CliError, CliResult, Globals};
use crate::resources::{Agent, Event, Kind, Lease, Queue, Task};
use crate::store::{Selector, Store, StoreError, WatchEvent, WatchOptions};

/// Resolves a kind as typed, with kubectl's error for an unknown one.
pub fn resolve_kind(s: &str) -> Result<Kind, CliError> {
    Kind::from_cli(s).ok_or_else(|| {
        CliError(format!(
            "error: the server doesn't have a resource type {s:?}"
        ))
    })
}

/// kubectl's error for a kind given both apart and in `KIND/NAME` form; `detail` ends it.
fn separate_kind(verb: &str, detail: &str) -> CliError {
    CliError(format!(
        "error: there is no need to specify a resource type as a separate argument when passing \
         arguments in resource/name form (e.g. 'tinyscheduler {verb} task/x'){detail}"
    ))
}

/// Resolves arguments in kubectl's `KIND/NAME` form, every one of them (`verb` is for the
/// message about one that is not).
pub fn slash_targets(args: &[String], verb: &str) -> Result<Vec<(Kind, String)>, CliError> {
    args.iter()
        .map(|t| {
            let (k, n) = t
                .split_once('/')
                .ok_or_else(|| separate_kind(verb, &format!("; got {t:?}")))?;
            if k.is_empty() || n.is_empty() || n.contains('/') {
                // kubectl's words for `agents/`, `/x` or `a/b/c`.
                return Err(CliError(format!(
                    "error: arguments in resource/name form must have a single resource and \
                     name; got {t:?}"
                )));
            }
            Ok((resolve_kind(k)?, n.to_string()))
        })
        .collect()
}

/// `KIND [NAME...]` or `KIND/NAME...` (of one kind) as a kind and names.
pub fn kind_and_names(
    kind: &str,
    names: &[String],
    verb: &str,
) -> Result<(Kind, Vec<String>), CliError> {
    if !kind.contains('/') {
        if names.iter().any(|n| n.contains('/')) {
            // `get task task/x`: the same message kubectl gives.
            slash_targets(names, verb)?;
            return Err(separate_kind(verb, ""));
        }
        return Ok((resolve_kind(kind)?, names.to_vec()));
    }
    let all: Vec<String> = std::iter::once(kind.to_string())
        .chain(names.iter().cloned())
        .collect();
    let targets = slash_targets(&all, verb)?;
    let first = targets[0].0;
    if targets.iter().any(|(k, _)| *k != first) {
        return Err(CliError(format!(
            "error: {verb} takes one kind at a time; run one {verb} per kind"
        )));
    }
    Ok((first, targets.into_iter().map(|(_, n)| n).collect()))
}

/// Parses `-l`.
pub fn parse_selector(s: Option<&str>) -> Result<Option<Selector>, CliError> {
    s.map(|s| Selector::parse(s).map_err(|e| CliError(format!("error: {e}"))))
        .transpose()
}

/// `get` entry point.
pub fn get(g: &Globals, a: GetArgs) -> CliResult {
    let (kind, names) = kind_and_names(&a.kind, &a.names, "get")?;
    let format = Format::parse(a.output.as_deref())?;
    let selector = parse_selector(a.selector.as_deref())?;
    // As kubectl: names and a selector would each narrow the answer another way.
    if selector.is_some() && !names.is_empty() {
        return Err(CliError(
            "error: name cannot be provided when a selector is specified".into(),
        ));
    }
    let store = Store::open_read_only(&g.state_dir);
    let opts = Opts {
        format,
        selector,
        no_headers: a.no_headers,
        watch: a.watch,
        names,
    };
    match kind {
        Kind::Agent => get_kind::<Agent>(&store, &opts),
        Kind::Queue => get_kind::<Queue>(&store, &opts),
        Kind::Task => get_kind::<Task>(&store, &opts),
        Kind::Lease => get_kind::<Lease>(&store, &opts),
        Kind::Event => get_kind::<Event>(&store, &opts),
    }
}

struct Opts {
    format: Format,
    selector: Option<Selector>,
    no_headers: bool,
    watch: bool,
    names: Vec<String>,
}

fn get_kind<K: Printable>(store: &Store, o: &Opts) -> CliResult {
    let mut errors = Vec::new();
    let mut items: Vec<K> = Vec::new();
    if o.names.is_empty() {
        let list = store.list::<K>(o.selector.as_ref())?;
        for s in &list.skipped {
            eprintln!("warning: skipping {}: {}", s.path.display(), s.reason);
        }
        items = list.items;
        K::sort(&mut items);
    } else {
        for n in &o.names {
            match store.try_get::<K>(n) {
                Ok(Some(obj)) => items.push(obj),
                Ok(None) => errors.push(CliError::from(StoreError::NotFound {
                    plural: K::PLURAL.into(),
                    name: n.clone(),
                })),
                Err(e) => errors.push(e.into()),
            }
        }
    }
    let now = SystemTime::now();
    let wide = o.format == Format::Wide;
    let mut table = Table::new(K::columns(wide));
    let structured = matches!(o.format, Format::Json | Format::Yaml);
    if items.is_empty() && !(structured && o.names.is_empty() && !o.watch) {
        if errors.is_empty() && !o.watch {
            eprintln!("No resources found.");
        }
    } else {
        // A list with no match is still a List (as kubectl prints it), so a pipe into jq works.
        let single = o.names.len() == 1;
        printers::with_stdout(|out| match o.format {
            Format::Table | Format::Wide => {
                table.rows = items.iter().map(|i| i.row(now, wide)).collect();
                table.write(out, o.no_headers)
            }
            Format::Json => printers::write_json(out, &items, single),
            Format::Yaml => printers::write_yaml(out, &items, single),
            Format::Name => printers::write_names(out, &items),
        })?;
    }
    let failed = !errors.is_empty();
    for e in errors {
        eprintln!("{e}");
    }
    // As kubectl: a name that is not there ends the watch before it starts (`wait` waits for
    // an object to appear).
    if o.watch && !failed {
        let headers_printed = !table.rows.is_empty() && !o.no_headers;
        watch(store, o, items, table, headers_printed)?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Follows the kind with `store.watch` and prints one row (or object) per change until SIGINT.
fn watch<K: Printable>(
    store: &Store,
    o: &Opts,
    items: Vec<K>,
    table: Table,
    mut headers_printed: bool,
) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("error: starting the runtime: {e}")))?;
    let widths = table.widths(!o.no_headers);
    let mut last: HashMap<String, K> = items
        .iter()
        .map(|i| (i.name().to_string(), i.clone()))
        .collect();
    rt.block_on(async {
        let mut w = store.watch::<K>(&items, WatchOptions::default())?;
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            let ev = tokio::select! {
                ev = w.next() => ev,
                _ = &mut ctrl_c => return Ok(()),
            };
            let obj = match ev {
                None => return Ok(()),
                Some(WatchEvent::Added(obj)) | Some(WatchEvent::Modified(obj)) => {
                    if !o.names.is_empty() && !o.names.iter().any(|n| n == obj.name()) {
                        continue;
                    }
                    if !o
                        .selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&obj.meta().labels))
                    {
                        // An object that stops matching leaves the watch with a last row, as the
                        // API server's DELETED event for it does; one never shown is no news.
                        if last.remove(obj.name()).is_none() {
                            continue;
                        }
                        obj
                    } else {
                        last.insert(obj.name().to_string(), obj.clone());
                        obj
                    }
                }
                Some(WatchEvent::Deleted { name, .. }) => match last.remove(&name) {
                    Some(obj) => obj,
                    None => continue,
                },
                Some(WatchEvent::Error(m)) => {
                    eprintln!("warning: watch: {m}");
                    continue;
                }
            };
            let r = print_one(&obj, o, &widths, &mut headers_printed);
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(CliError(format!("error: writing output: {e}"))),
            }
        }
    })
}

fn print_one<K: Printable>(
    obj: &K,
    o: &Opts,
    widths: &[usize],
    headers_printed: &mut bool,
) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match o.format {
        Format::Table | Format::Wide => {
            let wide = o.format == Format::Wide;
            let mut line = String::new();
            if !*headers_printed && !o.no_headers {
                printers::write_row(&mut line, K::columns(wide).into_iter(), widths);
                *headers_printed = true;
            }
            let row = obj.row(SystemTime::now(), wide);
            printers::write_row(&mut line, row.iter().map(String::as_str), widths);
            out.write_all(line.as_bytes())?;
        }
        Format::Json => printers::write_json(&mut out, std::slice::from_ref(obj), true)?,
        Format::Yaml => {
            out.write_all(b"---\n")?;
            printers::write_yaml(&mut out, std::slice::from_ref(obj), true)?
        }
        Format::Name => printers::write_names(&mut out, std::slice::from_ref(obj))?,
    }
    out.flush()
}
