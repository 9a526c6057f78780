//! `delete KIND NAME... | KIND/NAME... | -f FILE [--ignore-not-found]`.

use std::process::ExitCode;

use super::args::DeleteArgs;
use super::get::{resolve_kind, slash_targets};
use super::input;
use super::{CliError, CliResult, Globals};
use crate::controllers::tinytask_sync::{queue_owed_before_delete, remote_id, Owed};
use crate::resources::meta::GROUP;
use crate::resources::{Kind, Lease, Resource, Task};
use crate::store::{Store, StoreError};

/// Resolves the targets: `KIND NAME...`, `KIND/NAME...`, or the objects a manifest names.
fn targets(a: &DeleteArgs) -> Result<Vec<(Kind, String)>, CliError> {
    let mut out = Vec::new();
    if !a.files.is_empty() {
        let docs = input::read_all_reported(&a.files, a.recursive, "delete")?;
        for d in &docs {
            let kind = d.kind().and_then(Kind::from_kind_field).ok_or_else(|| {
                CliError(format!(
                    "error: {}: kind: missing or unknown kind {:?}",
                    d.origin(),
                    d.kind().unwrap_or("")
                ))
            })?;
            let name = d.name().filter(|n| !n.is_empty()).ok_or_else(|| {
                CliError(format!("error: {}: metadata.name: required", d.origin()))
            })?;
            out.push((kind, name.to_string()));
        }
        // Dependents first: tasks before the agents and queues they refer to.
        out.sort_by_key(|(k, _)| std::cmp::Reverse(Kind::ALL.iter().position(|x| x == k)));
    }
    if a.args.first().is_some_and(|s| s.contains('/')) {
        out.extend(slash_targets(&a.args, "delete")?);
    } else if let Some((kind, names)) = a.args.split_first() {
        let kind = resolve_kind(kind)?;
        if names.is_empty() {
            return Err(CliError(format!(
                "error: resource(s) were provided, but no name was specified (e.g. 'tinyscheduler delete {} NAME')",
                kind.singular()
            )));
        }
        out.extend(names.iter().map(|n| (kind, n.clone())));
    }
    if out.is_empty() {
        return Err(CliError(
            "error: you must provide one or more resources by argument or filename".into(),
        ));
    }
    Ok(out)
}

/// `delete` entry point.
pub fn delete(g: &Globals, a: DeleteArgs) -> CliResult {
    let targets = targets(&a)?;
    let store = if g.state_dir.exists() {
        Store::open(&g.state_dir)?
    } else {
        // Nothing to delete; do not create a state directory just to say so.
        Store::open_read_only(&g.state_dir)
    };
    let mut failed = false;
    for (kind, name) in targets {
        let exists = store.get_raw(kind.plural(), &name);
        let r = match exists {
            Ok(_) if kind == Kind::Task => owed_then_delete(g, &store, &name),
            Ok(_) => store.delete_raw(kind.plural(), &name, None).map(|_| ()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                crate::outln!("{}.{GROUP} {name:?} deleted", kind.singular());
                // As its TTL would, so that a Task created again under the name starts with none;
                // but not under a run that still lives (its Lease, named after the task): the
                // reclaim of that run finds the processes it left by their log, and removes the
                // logs after.
                let running = || !matches!(store.try_get::<Lease>(&name), Ok(None));
                if kind == Kind::Task && !running() {
                    if let Err(e) = crate::agent::shim::remove_logs(&g.state_dir, &name) {
                        eprintln!("warning: cannot remove {e}");
                    }
                }
            }
            Err(e) if e.is_not_found() && a.ignore_not_found => {}
            Err(e) => {
                failed = true;
                let refused = matches!(e, StoreError::Refused { .. });
                eprintln!("{}", CliError::from(e));
                if refused {
                    eprintln!(
                        "hint: the store never deletes a file it cannot read as an object; \
                         look at it and move it away by hand"
                    );
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Deletes Task `name`; a tinytask mirror first has what it still owes its server queued on its
/// Queue (`tinytask_sync::queue_owed_before_delete`), so that deleting it loses no result and
/// leaves no task `working` on the server. The delete is of the version read: a Task that changed
/// meanwhile (a running daemon recorded an outcome) is read again, so what it owes now is queued
/// too. A Task that cannot be read as a Task (torn, foreign) owes nothing that can be known, and
/// is deleted as any object.
fn owed_then_delete(g: &Globals, store: &Store, name: &str) -> Result<(), StoreError> {
    let endpoint = crate::config::settings_for(g)
        .map(|s| s.tinytask_endpoint.value)
        .unwrap_or_else(|_| crate::tinytask::DEFAULT_ENDPOINT.to_string());
    // A Task that changes all the time (it never does) is deleted as last read after a while.
    let mut tries = 0;
    loop {
        tries += 1;
        let Ok(task) = store.get::<Task>(name) else {
            return store.delete_raw(Task::PLURAL, name, None).map(|_| ());
        };
        match queue_owed_before_delete(store, &task, &endpoint)? {
            Owed::Nothing | Owed::Queued(..) => {}
            Owed::QueueGone(queue) => {
                let queue = if queue.is_empty() {
                    "it names no Queue".to_string()
                } else {
                    format!("its Queue {queue:?} is gone")
                };
                eprintln!(
                    "warning: task/{name} mirrors tinytask task {}, whose results and claim its \
                     Queue would send to the server, but {queue}: the server's task is left as \
                     it is",
                    remote_id(&task).unwrap_or_default()
                )
            }
        }
        let rv =
            Some(task.metadata.resource_version.as_str()).filter(|v| !v.is_empty() && tries < 20);
        match store.delete_raw(Task::PLURAL, name, rv) {
            Err(e) if e.is_conflict() => continue,
            r => return r.map(|_| ()),
        }
    }
}
