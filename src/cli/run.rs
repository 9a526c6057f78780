//! `tinyscheduler run --once | --daemon [--dry-run]`: take the instance lock, start the controllers,
//! and either reconcile to a fixed point and exit (agents keep running), or keep reacting until
//! SIGINT/SIGTERM, as a good systemd citizen (notify, watchdog, metrics and health endpoints).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::args::{Globals, RunArgs};
use super::{CliError, CliResult};
use crate::controllers::{tinytask_sync, Settings};
use crate::daemon::health::HealthRegistry;
use crate::daemon::http::HttpServer;
use crate::daemon::lock::InstanceLock;
use crate::daemon::notify::Notifier;
use crate::daemon::signals;
use crate::daemon::watchdog::{run_watchdog, Heartbeat, WatchdogConfig};
use crate::runtime::informer::InformerOptions;
use crate::scheduler::{Options, Scheduler};
use crate::store::Store;

/// Runs the scheduler in the mode `args` asks for.
pub fn run(g: &Globals, args: RunArgs) -> CliResult {
    if !args.once && !args.daemon {
        return Err(CliError(
            "error: say how to run: --once (reconcile to a fixed point and exit) or --daemon"
                .into(),
        ));
    }
    // clap's `requires = "once"` does not hold once `--daemon` conflicts with `--once`.
    if args.wait && !args.once {
        return Err(CliError(
            "error: --wait goes with --once (a daemon never finishes)".into(),
        ));
    }
    let http_flag =
        crate::config::current().is_some_and(|s| s.http_addr.source == crate::config::Source::Flag);
    if args.once && http_flag {
        return Err(CliError(
            "error: --http serves a daemon's metrics and health: use it with --daemon".into(),
        ));
    }
    let settings = controller_settings(g, args.dry_run)?;
    // A Python-era setting left in the env file would otherwise go unnoticed where it matters.
    for (var, why) in crate::config::current().map_or(&[][..], |s| &s.ignored[..]) {
        tracing::warn!(variable = %var, "{var} is set but has no effect: {why}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("error: cannot start the runtime: {e}")))?;
    if args.daemon {
        rt.block_on(daemon(g, &args, settings))
    } else {
        rt.block_on(once(g, &args, settings))
    }
}

/// Controller settings from the resolved settings (flags, environment, `.env`; checked there, so
/// a bad value has already stopped the program with an error naming it).
fn controller_settings(g: &Globals, dry_run: bool) -> Result<Settings, CliError> {
    let c = crate::config::settings_for(g).map_err(|e| CliError(format!("error: {e}")))?;
    Ok(Settings {
        dry_run,
        disable_blocking: c.disable_blocking.value,
        retry_base: c.retry_base.value,
        retry_cap: c.retry_max.value,
        kill_grace: c.kill_grace.value,
        tinytask_endpoint: c.tinytask_endpoint.value,
        workers: c.workers.value as usize,
        ..Settings::default()
    })
}

/// Opens the store and takes the lock — or, in a dry run, opens it read-only and takes nothing, so
/// that not a byte of the state directory changes.
fn open(g: &Globals, dry_run: bool) -> Result<(Store, Option<InstanceLock>), CliError> {
    if dry_run {
        return Ok((Store::open_read_only(&g.state_dir), None));
    }
    let store = Store::open(&g.state_dir)?;
    let lock = InstanceLock::acquire(&g.state_dir).map_err(|e| CliError(format!("error: {e}")))?;
    store.remove_orphaned_temp_files()?;
    // A Python-era installation swapped to this binary keeps its agents: the agent-control file
    // and limits from the environment become Agents and Queues.
    for line in super::import::apply_python_era(g, &store)? {
        tracing::info!("{line}");
    }
    Ok((store, Some(lock)))
}

fn start(
    g: &Globals,
    store: Store,
    settings: Settings,
    heartbeat: Option<Heartbeat>,
    progress: bool,
) -> Scheduler {
    let opts = Options {
        informers: InformerOptions::from_env(),
        heartbeat,
        progress,
    };
    Scheduler::start(store, g.state_dir.clone(), settings, opts)
}

async fn once(g: &Globals, args: &RunArgs, settings: Settings) -> CliResult {
    let (store, _lock) = open(g, args.dry_run)?;
    // A dry run changes nothing, so nothing it would start ever finishes: one pass is all.
    let wait = args.wait && !args.dry_run;
    if args.wait && args.dry_run {
        eprintln!("note: a dry run ends after one pass; --wait would wait for ever");
    }
    // SIGTERM (systemctl stop, the unit's start timeout) or SIGINT ends the pass as the daemon
    // ends: no new work, the reconciles in flight finish, the summary is printed. (A second one
    // exits at once.)
    let sig = signals::install().map_err(|e| CliError(format!("error: signals: {e}")))?;
    let sched = start(g, store, settings, None, wait);
    let mut interrupted = false;
    tokio::select! {
        synced = sched.wait_synced_or_failed() => {
            // A pass that cannot see the store would wait for ever: it fails and says why, and
            // the next pass (the next timer tick) tries again.
            if let Err(why) = synced {
                sched.stop().await;
                return Err(CliError(format!("error: {why}")));
            }
        }
        _ = sig.shutdown.wait() => interrupted = true,
    }
    if interrupted {
        // Not synced yet: nothing was decided.
    } else if wait {
        let wait = async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sig.shutdown.wait() => break,
                }
                if sched.all_done() {
                    sched.wait_fixed_point().await;
                    if sched.all_done() {
                        break;
                    }
                }
            }
        };
        // Says now and then what it still waits for, also while waiting for the fixed point.
        let report = async {
            let start = tokio::time::Instant::now() + WAIT_REPORT_EVERY;
            let mut every = tokio::time::interval_at(start, WAIT_REPORT_EVERY);
            loop {
                every.tick().await;
                report_waiting(&sched);
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = report => {}
        }
    } else {
        tokio::select! {
            _ = sched.wait_fixed_point() => {}
            _ = sig.shutdown.wait() => {}
        }
    }
    if !interrupted {
        // The assignment stops first: a pass woken by a retry falling due just now may still be
        // committing Leases, and each gets its shim before the rest stops (for a moment only
        // when a signal ends the pass, as it ends the daemon).
        sched.stop_assigning().await;
        if sig.shutdown.is_triggered() {
            tracing::warn!("interrupted: stopping after the reconciles in flight");
            let _ = tokio::time::timeout(SHIMS_AT_STOP, sched.wait_fixed_point()).await;
        } else {
            tokio::select! {
                _ = sched.wait_fixed_point() => {}
                _ = sig.shutdown.wait() => {}
            }
        }
    }
    let ctx = Arc::clone(&sched.ctx);
    // A reconcile that panicked is a failure too, though the controller carried on.
    let panics = sched.panics();
    if panics > 0 {
        ctx.summary.errors.fetch_add(panics, Ordering::Relaxed);
    }
    sched.stop().await;
    // What `get agents` and `get queues` show after the pass: failing to write it is a failure.
    if let Err(e) = crate::controllers::status::flush_all(&ctx) {
        tracing::error!("cannot write agent and queue status: {e}");
        ctx.summary.errors.fetch_add(1, Ordering::Relaxed);
    }
    if !args.dry_run {
        if let Err(e) = ctx.recorder.gc() {
            tracing::warn!("event garbage collection failed: {e}");
        }
    }
    for (queue, e) in tinytask_sync::unreachable_sources(&ctx) {
        crate::daemon::logging::print_error(&format!(
            "error: queue/{queue}: tinytask source unreachable: {e}"
        ));
    }
    let errors = ctx.summary.errors.load(Ordering::Relaxed);
    crate::outln!("{}", ctx.summary);
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// How long a stopping scheduler (the daemon, or a pass ended by a signal) gives the shims of
/// Leases already committed to start.
const SHIMS_AT_STOP: Duration = Duration::from_secs(2);

/// How often `run --once --wait` says what it is still waiting for.
const WAIT_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Logs why `run --once --wait` has not finished yet: the Leases, tinytask queues and tasks that
/// keep it going, and the controllers with work in hand.
fn report_waiting(sched: &Scheduler) {
    let waiting = sched.waiting_on();
    let busy = sched.busy_controllers();
    tracing::info!(
        "run --once --wait is still waiting for: {}{}",
        if waiting.is_empty() {
            "the controllers to go idle".to_string()
        } else {
            waiting.join("; ")
        },
        if busy.is_empty() {
            String::new()
        } else {
            format!(" (controllers at work: {})", busy.join(", "))
        }
    );
}

async fn daemon(g: &Globals, args: &RunArgs, settings: Settings) -> CliResult {
    let settings = Settings {
        mirror_delay: crate::controllers::MIRROR_DELAY,
        ..settings
    };
    let sig = signals::install().map_err(|e| CliError(format!("error: signals: {e}")))?;
    let notifier = Notifier::from_env();
    let (store, lock) = open(g, args.dry_run)?;
    // Bound before anything starts: a taken port stops the daemon with nothing decided or started.
    let listener = match &args.http {
        Some(addr) => Some(
            crate::daemon::http::listen(addr)
                .await
                .map_err(|e| CliError(format!("error: --http {addr}: {e}")))?,
        ),
        None => None,
    };
    let heartbeat = Heartbeat::new();
    let sched = start(g, store, settings, Some(heartbeat.clone()), false);
    let ctx = Arc::clone(&sched.ctx);
    let metrics = sched.metrics.clone();

    let health = HealthRegistry::new();
    let beats = heartbeat.clone();
    health.add_liveness("reconcile-loop", move || {
        beats.check_alive(Duration::from_secs(60))
    });
    let c = Arc::clone(&ctx);
    health.add_readiness("informers-synced", move || {
        let synced = c.tasks.is_synced()
            && c.agents.is_synced()
            && c.queues.is_synced()
            && c.leases.is_synced();
        if synced {
            Ok(())
        } else {
            Err("informers have not finished their initial list".into())
        }
    });
    let c = Arc::clone(&ctx);
    health.add_readiness("tinytask-sources", move || tinytask_sync::check_sources(&c));
    let lock = lock.map(Arc::new);
    let held = lock.clone();
    let dry_run = args.dry_run;
    health.add_readiness("lock", move || match &held {
        Some(l) => l.check(),
        // A dry run decides nothing, so it takes no lock.
        None if dry_run => Ok(()),
        None => Err("the instance lock is not held".into()),
    });

    let mut background = tokio::task::JoinSet::new();
    if let Some(listener) = listener {
        let c = Arc::clone(&ctx);
        let m = metrics.clone();
        let server = HttpServer::on(
            listener,
            move || crate::scheduler::render_metrics(&c, &m),
            health.clone(),
        );
        let stop = sig.shutdown.wait();
        background.spawn(async move {
            if let Err(e) = server.serve(stop).await {
                tracing::error!("HTTP server failed: {e}");
            }
        });
    }

    // A stop asked for while the caches still load (a huge or unreadable store) is obeyed now,
    // not after them: systemd would otherwise wait out TimeoutStopSec and SIGKILL.
    tokio::select! {
        _ = sched.wait_synced() => {}
        _ = sig.shutdown.wait() => {
            notify(notifier.stopping(), "STOPPING=1");
            tracing::info!("stopping before the caches were loaded; running agents are left running");
            sched.stop().await;
            background.abort_all();
            return Ok(ExitCode::SUCCESS);
        }
    }
    // The heartbeat key goes through the assignment queue, so a wedged loop stops the beats.
    // Poke twice per watchdog check: at the same period the poke and the check race, and a
    // healthy loop would miss pings (two misses in a row are a systemd restart).
    let interval = WatchdogConfig::from_env()
        .map(|w| w.interval / 2)
        .unwrap_or(Duration::from_secs(10))
        .clamp(Duration::from_millis(10), Duration::from_secs(10));
    sched.poke_heartbeat();
    if let Some(cfg) = WatchdogConfig::from_env() {
        background.spawn(run_watchdog(notifier.clone(), heartbeat.clone(), cfg));
    }
    // Events are kept to 50 per object and 1 hour; the first pass runs at once.
    let events_gc = (!args.dry_run).then(|| ctx.recorder.spawn_gc(Duration::from_secs(300)));
    notify(notifier.ready(), "READY=1");
    tracing::info!(state_dir = %g.state_dir.display(), "scheduler running");

    let mut reloads = sig.reloads;
    let mut tick = tokio::time::interval(interval);
    let mut last_status = String::new();
    let mut lost_lock = false;
    loop {
        tokio::select! {
            _ = sig.shutdown.wait() => break,
            Some(()) = reloads.recv() => {
                notify(notifier.reloading(), "RELOADING=1");
                tracing::info!("reload: settings are read at start; controllers keep running");
                notify(notifier.ready(), "READY=1");
            }
            _ = tick.tick() => {
                if let Some(Err(e)) = lock.as_ref().map(|l| l.check()) {
                    tracing::error!(
                        "lost the instance lock: {e}; stopping, so that no second scheduler \
                         decides beside this one"
                    );
                    lost_lock = true;
                    break;
                }
                sched.poke_heartbeat();
                let status = status_line(&ctx);
                if status != last_status {
                    notify(notifier.status(&status), "STATUS");
                    last_status = status;
                }
            }
        }
    }
    notify(notifier.stopping(), "STOPPING=1");
    let reason = sig.shutdown.reason().unwrap_or_default();
    tracing::info!(%reason, "stopping; running agents are left running");
    if !lost_lock {
        // No new Lease from here on; those the last passes committed get their shims for a
        // moment, as `run --once` gives them: a Lease left Pending is reclaimed as never started
        // (an attempt spent) by a scheduler that comes back after its duration.
        sched.stop_assigning().await;
        let _ = tokio::time::timeout(SHIMS_AT_STOP, sched.wait_fixed_point()).await;
    }
    sched.stop().await;
    background.abort_all();
    if let Some(h) = events_gc {
        h.abort();
    }
    // Non-zero, so that systemd restarts it: the new process takes the lock again, or says who
    // holds it now.
    Ok(if lost_lock {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Logs a notification systemd did not get: under `Type=notify` a lost READY=1 is a start that
/// times out, which the journal should explain.
fn notify(sent: std::io::Result<()>, what: &str) {
    if let Err(e) = sent {
        tracing::warn!("could not send {what} to systemd: {e}");
    }
}

/// One line for systemd's STATUS=: running / queued / failed.
fn status_line(ctx: &crate::controllers::Ctx) -> String {
    use crate::resources::TaskPhase::*;
    let (mut running, mut queued, mut failed) = (0, 0, 0);
    for t in ctx.tasks.list() {
        match t.status.phase {
            Assigned | Running => running += 1,
            Pending | Blocked => queued += 1,
            Failed => failed += 1,
            Succeeded => {}
        }
    }
    format!("{running} running, {queued} queued, {failed} failed")
}
