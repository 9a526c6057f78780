//! Work queue and controller semantics, on virtual time (and on real threads where that is the point).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tinyscheduler::runtime::workqueue::MAX_DELAY;
use tinyscheduler::runtime::{Action, Backoff, Controller, Metrics, WorkQueue};
use tokio::time::{advance, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets spawned tasks run without moving the clock. (To let virtual time pass, tests sleep: on a
/// paused clock the runtime jumps from timer to timer as soon as every task is idle.)
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_queued_twice_is_handed_out_once() {
    let q = WorkQueue::new(Backoff::default());
    q.add("a".to_string());
    q.add("a".to_string());
    q.add("b".to_string());
    assert_eq!(q.len(), 2);
    assert_eq!(q.get().await.as_deref(), Some("a"));
    assert_eq!(q.get().await.as_deref(), Some("b"));
    assert!(q.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_key_being_processed_is_not_handed_to_another_worker() {
    let q = WorkQueue::new(Backoff::default());
    q.add("a".to_string());
    let k = q.get().await.unwrap();
    q.add("a".to_string());
    assert_eq!(
        q.len(),
        0,
        "re-added while processing: held back until done"
    );
    let q2 = q.clone();
    let second = tokio::spawn(async move { q2.get().await });
    settle().await;
    assert!(
        !second.is_finished(),
        "a second worker must not get the key yet"
    );
    q.done(&k);
    assert_eq!(second.await.unwrap().as_deref(), Some("a"));
}

#[tokio::test(start_paused = true)]
async fn a_key_changed_during_processing_is_processed_again_after_done() {
    let q = WorkQueue::new(Backoff::default());
    q.add("a".to_string());
    let k = q.get().await.unwrap();
    q.add("a".to_string());
    q.add("a".to_string());
    q.done(&k);
    assert_eq!(q.len(), 1);
    let k = q.get().await.unwrap();
    q.done(&k);
    assert!(q.is_idle());
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_5_10_20_40_ms_up_to_the_cap_and_forget_resets() {
    let q = WorkQueue::new(Backoff::new(ms(5), ms(100)));
    let key = "k".to_string();
    let mut delays = vec![];
    for _ in 0..7 {
        let t0 = Instant::now();
        q.add_rate_limited(key.clone());
        let k = q.get().await.unwrap();
        delays.push(t0.elapsed());
        q.done(&k);
    }
    assert_eq!(
        delays,
        vec![ms(5), ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]
    );
    assert_eq!(q.num_requeues(&key), 7);
    q.forget(&key);
    assert_eq!(q.num_requeues(&key), 0);
    let t0 = Instant::now();
    q.add_rate_limited(key.clone());
    q.get().await.unwrap();
    assert_eq!(t0.elapsed(), ms(5));
}

#[tokio::test(start_paused = true)]
async fn add_after_keeps_the_earliest_due_time() {
    let q = WorkQueue::new(Backoff::default());
    let t0 = Instant::now();
    q.add_after("a".to_string(), ms(300));
    q.add_after("a".to_string(), ms(100));
    q.add_after("a".to_string(), ms(200));
    assert_eq!(q.get().await.as_deref(), Some("a"));
    assert_eq!(t0.elapsed(), ms(100));
    q.done(&"a".to_string());
    // The later due times were folded into the earliest: nothing else arrives.
    advance(ms(500)).await;
    settle().await;
    assert_eq!(q.len(), 0);
    assert_eq!(q.delayed_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_delay_past_the_clocks_range_waits_a_day_instead_of_panicking() {
    let q = WorkQueue::new(Backoff::default());
    q.add_after("far".to_string(), Duration::MAX);
    q.add_after("year".to_string(), Duration::from_secs(365 * 24 * 3600));
    assert_eq!(q.delayed_len(), 2);
    tokio::time::sleep(MAX_DELAY - ms(1)).await;
    settle().await;
    assert!(q.is_empty(), "not due before a day has passed");
    tokio::time::sleep(ms(2)).await;
    settle().await;
    assert_eq!(q.len(), 2, "both keys are back after a day");
}

#[tokio::test(start_paused = true)]
async fn wait_idle_returns_once_nothing_is_ready_or_processing_ignoring_delayed_keys() {
    let q = WorkQueue::new(Backoff::default());
    q.add_after("later".to_string(), Duration::from_secs(60));
    assert!(q.is_idle());
    q.add("a".to_string());
    assert!(!q.is_idle());
    let k = q.get().await.unwrap();
    assert!(!q.is_idle());
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { q2.wait_idle().await });
    settle().await;
    assert!(!waiter.is_finished());
    q.done(&k);
    waiter.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_wakes_getters_with_none_and_ignores_later_adds() {
    let q: WorkQueue<String> = WorkQueue::new(Backoff::default());
    let q2 = q.clone();
    let getter = tokio::spawn(async move { q2.get().await });
    settle().await;
    q.shutdown();
    assert_eq!(getter.await.unwrap(), None);
    q.add("a".to_string());
    assert_eq!(q.len(), 0);
    assert!(q.is_shutting_down());
}

// ----- controller -----

#[derive(Default)]
struct Ctx {
    calls: Mutex<Vec<(String, Instant)>>,
    running: Mutex<HashSet<String>>,
    overlap: AtomicUsize,
}

#[tokio::test(start_paused = true)]
async fn requeue_after_brings_the_key_back_after_the_delay() {
    let ctx = Arc::new(Ctx::default());
    let c = Controller::new("requeue", ctx.clone(), Metrics::default());
    let q = c.queue();
    q.add("a".into());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let t0 = Instant::now();
    let run = tokio::spawn(c.run(
        |key, ctx: Arc<Ctx>| async move {
            let n = {
                let mut calls = ctx.calls.lock().unwrap();
                calls.push((key, Instant::now()));
                calls.len()
            };
            if n < 3 {
                Ok::<_, String>(Action::requeue_after(Duration::from_secs(10)))
            } else {
                Ok(Action::await_change())
            }
        },
        async {
            let _ = rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_secs(25)).await;
    let times: Vec<Duration> = ctx
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| *t - t0)
        .collect();
    assert_eq!(
        times,
        vec![
            Duration::ZERO,
            Duration::from_secs(10),
            Duration::from_secs(20)
        ]
    );
    tx.send(()).unwrap();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconciler_is_backed_off_and_the_controller_lives_on() {
    let ctx = Arc::new(Ctx::default());
    let metrics = Metrics::default();
    let c = Controller::new("panicky", ctx.clone(), metrics.clone());
    let q = c.queue();
    q.add("boom".into());
    q.add("fine".into());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(c.run(
        |key: String, ctx: Arc<Ctx>| async move {
            ctx.calls
                .lock()
                .unwrap()
                .push((key.clone(), Instant::now()));
            if key == "boom"
                && ctx
                    .calls
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| k == "boom")
                    .count()
                    < 3
            {
                panic!("reconciler bug");
            }
            Ok::<_, String>(Action::await_change())
        },
        async {
            let _ = rx.await;
        },
    ));
    tokio::time::sleep(ms(100)).await;
    let calls = ctx.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().filter(|(k, _)| k == "boom").count(), 3);
    assert_eq!(calls.iter().filter(|(k, _)| k == "fine").count(), 1);
    q.add("fine".into());
    settle().await;
    assert_eq!(
        ctx.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == "fine")
            .count(),
        2
    );
    let text = metrics.render();
    assert!(
        text.contains("tinyscheduler_reconcile_errors_total{controller=\"panicky\"} 2"),
        "{text}"
    );
    assert_eq!(
        tinyscheduler::runtime::controller::panics(&metrics, "panicky"),
        2,
        "{text}"
    );
    for line in [
        "tinyscheduler_reconcile_total{controller=\"panicky\",result=\"error\"} 2",
        "tinyscheduler_reconcile_total{controller=\"panicky\",result=\"success\"} 3",
        "tinyscheduler_workqueue_retries_total{name=\"panicky\"} 2",
        "tinyscheduler_workqueue_depth{name=\"panicky\"} 0",
        "tinyscheduler_reconcile_duration_seconds_count{controller=\"panicky\"} 5",
        "tinyscheduler_workqueue_queue_duration_seconds_bucket{name=\"panicky\",le=\"+Inf\"} 5",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    tx.send(()).unwrap();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_key_is_never_reconciled_by_two_workers_at_once() {
    let ctx = Arc::new(Ctx::default());
    let c = Controller::new("exclusive", ctx.clone(), Metrics::default()).workers(4);
    let q = c.queue();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(c.run(
        |key: String, ctx: Arc<Ctx>| async move {
            if !ctx.running.lock().unwrap().insert(key.clone()) {
                ctx.overlap.fetch_add(1, Ordering::SeqCst);
            }
            ctx.calls
                .lock()
                .unwrap()
                .push((key.clone(), Instant::now()));
            tokio::time::sleep(ms(10)).await;
            ctx.running.lock().unwrap().remove(&key);
            Ok::<_, String>(Action::await_change())
        },
        async {
            let _ = rx.await;
        },
    ));
    for _ in 0..20 {
        q.add("a".into());
        q.add("b".into());
        tokio::time::sleep(ms(3)).await;
    }
    tokio::time::sleep(ms(100)).await;
    assert_eq!(ctx.overlap.load(Ordering::SeqCst), 0);
    assert!(ctx.calls.lock().unwrap().len() >= 10);
    tx.send(()).unwrap();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_reconciles_finish_and_starts_no_new_ones() {
    let ctx = Arc::new(Ctx::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let c = Controller::new("graceful", ctx.clone(), Metrics::default()).workers(2);
    let q = c.queue();
    for k in ["a", "b", "c", "d"] {
        q.add(k.into());
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let f = finished.clone();
    let run = tokio::spawn(c.run(
        move |key: String, ctx: Arc<Ctx>| {
            let f = f.clone();
            async move {
                ctx.calls.lock().unwrap().push((key, Instant::now()));
                tokio::time::sleep(Duration::from_secs(5)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Action::await_change())
            }
        },
        async {
            let _ = rx.await;
        },
    ));
    settle().await;
    assert_eq!(
        ctx.calls.lock().unwrap().len(),
        2,
        "two workers, two in flight"
    );
    tx.send(()).unwrap();
    run.await.unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "in-flight work finished"
    );
    assert_eq!(
        ctx.calls.lock().unwrap().len(),
        2,
        "queued work was not started"
    );
    assert!(q.is_shutting_down());
}

#[tokio::test(start_paused = true)]
async fn a_reconcile_that_outlives_the_grace_period_is_cancelled_and_run_returns() {
    let ctx = Arc::new(Ctx::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let c = Controller::new("stuck", ctx.clone(), Metrics::default())
        .grace_period(Duration::from_secs(2));
    c.queue().add("a".into());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let f = finished.clone();
    let run = tokio::spawn(c.run(
        move |_key: String, _ctx: Arc<Ctx>| {
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Action::await_change())
            }
        },
        async {
            let _ = rx.await;
        },
    ));
    settle().await;
    let t0 = Instant::now();
    tx.send(()).unwrap();
    run.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn keys_added_while_workers_wait_reach_them_one_each_and_none_is_lost() {
    let q = WorkQueue::new(Backoff::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..4 {
        let (q, tx) = (q.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(k) = q.get().await {
                let _ = tx.send((w, k));
            }
        });
    }
    settle().await;
    q.add("a".to_string());
    settle().await;
    let first = rx.try_recv().expect("one worker took the key");
    assert!(rx.try_recv().is_err(), "one key is handed out once");
    // Three keys at once for the three workers still waiting: each gets one.
    for k in ["b", "c", "d"] {
        q.add(k.to_string());
    }
    settle().await;
    let mut got: Vec<String> = vec![first.1];
    let mut workers: HashSet<usize> = HashSet::from([first.0]);
    while let Ok((w, k)) = rx.try_recv() {
        got.push(k);
        workers.insert(w);
    }
    got.sort();
    assert_eq!(got, ["a", "b", "c", "d"]);
    assert_eq!(workers.len(), 4, "every worker got a key of its own");
}

#[tokio::test(start_paused = true)]
async fn a_key_added_while_no_worker_waits_is_taken_by_the_next_get() {
    let q = WorkQueue::new(Backoff::default());
    q.add("a".to_string());
    q.add("b".to_string());
    assert_eq!(q.get().await.as_deref(), Some("a"));
    assert_eq!(q.get().await.as_deref(), Some("b"));
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { q2.get().await });
    settle().await;
    q.add("c".to_string());
    let got = tokio::time::timeout(ms(1000), waiter).await;
    assert_eq!(got.unwrap().unwrap().as_deref(), Some("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_reconcile_on_threads_of_their_own_and_stop_at_shutdown() {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let c = Controller::new("blocky", seen.clone(), Metrics::default())
        .workers(2)
        .worker_threads();
    let q = c.queue();
    for k in ["a", "b", "c", "d"] {
        q.add(k.to_string());
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(c.run(
        |key: String, seen: Arc<Mutex<Vec<(String, String)>>>| async move {
            // A reconcile that blocks its thread, as a store write does.
            std::thread::sleep(ms(20));
            let thread = std::thread::current().name().unwrap_or("").to_string();
            seen.lock().unwrap().push((key, thread));
            Ok::<_, String>(Action::await_change())
        },
        async {
            let _ = rx.await;
        },
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        while seen.lock().unwrap().len() < 4 {
            tokio::time::sleep(ms(5)).await;
        }
    })
    .await
    .expect("every key reconciled");
    let seen = seen.lock().unwrap().clone();
    let mut keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["a", "b", "c", "d"]);
    assert!(
        seen.iter().all(|(_, t)| t == "blocky-0" || t == "blocky-1"),
        "{seen:?}"
    );
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the controller stops at shutdown")
        .unwrap();
}
