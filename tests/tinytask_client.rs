//! The tinytask client against the fake tinytask server on 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use support::tinytask_server::TinytaskServer;
use tinyscheduler::tinytask::{
    Client, ClientConfig, Conditional, Error, ListQuery, NewTask, RetryPolicy, TaskPatch,
    TaskStatus, Transfer, SCAN_WINDOW_MAX,
};

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base: Duration::from_millis(5),
        cap: Duration::from_millis(20),
    }
}

fn client(server: &TinytaskServer) -> Client {
    Client::with_config(
        ClientConfig::new(server.url())
            .timeout(Duration::from_secs(2))
            .retry(fast_retries()),
    )
    .unwrap()
}

fn queued(server: &TinytaskServer, title: &str, queue: &str, priority: f64) -> i64 {
    server.insert(title, |t| {
        t.queue_name = Some(queue.into());
        t.priority = priority;
    })
}

#[tokio::test]
async fn listing_filters_by_queue_and_statuses_orders_by_priority_and_always_sends_a_limit() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let low = queued(&server, "low", "dev", 1.0);
    let high = queued(&server, "high", "dev", 5.0);
    let working = queued(&server, "busy", "dev", 9.0);
    server.mutate_task(working, |t| t.status = "working".into());
    queued(&server, "other", "qa", 3.0);

    let idle = c
        .list_tasks(&ListQuery::new(10).queue("dev").status(TaskStatus::Idle))
        .await
        .unwrap();
    assert_eq!(
        idle.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![high, low]
    );

    let both = c
        .list_tasks(
            &ListQuery::new(10)
                .queue("dev")
                .status(TaskStatus::Idle)
                .status(TaskStatus::Working),
        )
        .await
        .unwrap();
    assert_eq!(both.len(), 3);
    assert_eq!(both[0].id, working);

    let one = c.list_tasks(&ListQuery::new(1).queue("dev")).await.unwrap();
    assert_eq!(one.len(), 1);

    let reqs = server.requests();
    assert!(reqs
        .iter()
        .all(|r| r.query.as_deref().unwrap_or("").contains("limit=")));
    assert!(reqs[1]
        .query
        .as_deref()
        .unwrap()
        .contains("status=idle%2Cworking"));
}

#[tokio::test]
async fn a_task_can_be_read_patched_commented_and_transferred() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let created = c
        .create_task(&NewTask {
            title: "fix login".into(),
            created_by: "tester".into(),
            queue_name: Some("dev".into()),
            priority: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.status, TaskStatus::Idle);
    let id = created.id;

    let t = c
        .patch_task(id, &TaskPatch::new().assign("vaela"))
        .await
        .unwrap();
    assert_eq!(t.assigned_to.as_deref(), Some("vaela"));
    let t = c
        .patch_task(
            id,
            &TaskPatch::new()
                .unassign()
                .status(TaskStatus::Working)
                .priority(7)
                .queue_name("qa")
                .tags(Some(vec!["x".into()])),
        )
        .await
        .unwrap();
    assert_eq!(t.assigned_to, None);
    assert_eq!(t.previous_assigned_to.as_deref(), Some("vaela"));
    assert_eq!(t.status, TaskStatus::Working);
    assert_eq!(t.priority, 7.0);
    assert_eq!(t.queue(), Some("qa"));
    assert_eq!(t.tags, vec!["x".to_string()]);
    assert!(server
        .requests()
        .last()
        .unwrap()
        .body
        .contains("\"assigned_to\":null"));

    let comment = c
        .add_comment(id, "run failed: exit 2", "tinyscheduler")
        .await
        .unwrap();
    assert_eq!(comment.content, "run failed: exit 2");
    let read = c.get_task(id).await.unwrap();
    assert_eq!(read.comments.len(), 1);

    c.patch_task(id, &TaskPatch::new().assign("vaela"))
        .await
        .unwrap();
    let moved = c
        .transfer(
            id,
            &Transfer {
                current_agent: "vaela".into(),
                new_agent: "damien".into(),
                comment: "rebalanced".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(moved.assigned_to.as_deref(), Some("damien"));
    assert_eq!(moved.status, TaskStatus::Idle);
}

#[tokio::test]
async fn a_transfer_from_the_wrong_assignee_is_refused_with_the_servers_message() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let id = queued(&server, "t", "dev", 0.0);
    c.patch_task(id, &TaskPatch::new().assign("vaela"))
        .await
        .unwrap();
    // Someone else reassigns between our read and our transfer.
    server.before_next_request(move |db| {
        db.tasks.get_mut(&id).unwrap().assigned_to = Some("oscar".into());
    });
    let err = c
        .transfer(
            id,
            &Transfer {
                current_agent: "vaela".into(),
                new_agent: "damien".into(),
                comment: "x".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("not assigned to vaela"), "{err}");
    assert_eq!(
        server.task(id).unwrap().assigned_to.as_deref(),
        Some("oscar")
    );
}

#[tokio::test]
async fn a_missing_task_is_a_404_carrying_the_servers_error_message() {
    let server = TinytaskServer::start().await;
    let err = client(&server).get_task(99).await.unwrap_err();
    assert!(err.is_not_found());
    match &err {
        Error::Status {
            message, request, ..
        } => {
            assert_eq!(message, "Task 99 not found");
            assert!(request.starts_with("GET http://127.0.0.1:"), "{request}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn queue_stats_and_queue_names_are_read() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let a = queued(&server, "a", "dev", 0.0);
    queued(&server, "b", "dev", 0.0);
    queued(&server, "c", "qa", 0.0);
    server.mutate_task(a, |t| {
        t.assigned_to = Some("vaela".into());
        t.status = "working".into();
    });
    let s = c.queue_stats("dev").await.unwrap();
    assert_eq!(s.queue_name, "dev");
    assert_eq!(s.total_tasks, 2);
    assert_eq!(s.by_status.idle, 1);
    assert_eq!(s.by_status.working, 1);
    assert_eq!((s.assigned, s.unassigned), (1, 1));
    assert_eq!(s.agents, vec!["vaela".to_string()]);
    assert_eq!(
        c.list_queues().await.unwrap(),
        vec!["dev".to_string(), "qa".to_string()]
    );
    assert_eq!(c.health().await.unwrap().status, "healthy");
}

#[tokio::test]
async fn an_unchanged_list_or_stats_answers_not_modified_until_something_changes() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let id = queued(&server, "a", "dev", 0.0);
    let q = ListQuery::new(10).queue("dev").status(TaskStatus::Idle);

    let Conditional::Modified { value, etag } = c.list_tasks_if_changed(&q, None).await.unwrap()
    else {
        panic!("first read must carry the list");
    };
    assert_eq!(value.len(), 1);
    let etag = etag.expect("the server sends an ETag");
    assert!(etag.starts_with("W/"), "{etag}");
    assert_eq!(
        c.list_tasks_if_changed(&q, Some(&etag)).await.unwrap(),
        Conditional::NotModified
    );

    let Conditional::Modified { etag: stag, .. } =
        c.queue_stats_if_changed("dev", None).await.unwrap()
    else {
        panic!()
    };
    let stag = stag.unwrap();
    assert!(!c
        .queue_stats_if_changed("dev", Some(&stag))
        .await
        .unwrap()
        .is_modified());

    server.mutate_task(id, |t| t.assigned_to = Some("vaela".into()));
    assert!(c
        .list_tasks_if_changed(&q, Some(&etag))
        .await
        .unwrap()
        .is_modified());
    assert!(c
        .queue_stats_if_changed("dev", Some(&stag))
        .await
        .unwrap()
        .is_modified());
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_until_success() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    queued(&server, "a", "dev", 0.0);
    server.fail_next(2, 503);
    let tasks = c.list_tasks(&ListQuery::new(5).queue("dev")).await.unwrap();
    assert_eq!(tasks.len(), 1);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
}

#[tokio::test]
async fn server_errors_past_the_attempt_budget_are_reported_with_the_status() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    server.fail_next(10, 500);
    let err = c.list_queues().await.unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(server.requests().len(), 4, "bounded attempts");
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let err = c.get_task(12345).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    let err = c
        .patch_task(1, &TaskPatch::new().status(TaskStatus::Idle))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_non_idempotent_post_is_not_repeated_after_a_server_error() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let id = queued(&server, "a", "dev", 0.0);
    server.fail_next(1, 502);
    let err = c.add_comment(id, "hello", "me").await.unwrap_err();
    assert_eq!(err.status(), Some(502));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn malformed_json_is_reported_with_the_endpoint() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    server.malformed_next(1);
    let err = c.get_task(1).await.unwrap_err();
    match &err {
        Error::Decode { request, .. } => {
            assert_eq!(request, &format!("GET {}/api/v1/tasks/1", server.url()))
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert!(err.to_string().contains("malformed JSON"), "{err}");
}

#[tokio::test]
async fn a_stopped_server_gives_a_connect_error_quickly_and_a_restart_recovers() {
    let mut server = TinytaskServer::start().await;
    let c = client(&server);
    c.health().await.unwrap(); // leaves a pooled connection behind
    server.stop().await;
    let started = Instant::now();
    let err = c.health().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_unreachable());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    server.restart().await;
    assert_eq!(c.health().await.unwrap().status, "healthy");
}

#[tokio::test]
async fn a_slow_answer_times_out_instead_of_hanging() {
    let server = TinytaskServer::start().await;
    let c = Client::with_config(
        ClientConfig::new(server.url())
            .timeout(Duration::from_millis(200))
            .retry(RetryPolicy::none()),
    )
    .unwrap();
    server.delay_next(1, Duration::from_secs(3));
    let started = Instant::now();
    let err = c.list_queues().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn float_priorities_null_tags_empty_queues_and_unknown_fields_are_tolerated() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    let id = server.insert("odd", |t| {
        t.priority = 2.5;
        t.tags = None;
        t.queue_name = Some(String::new());
        t.extra
            .insert("brand_new".into(), serde_json::json!({"nested": [1, 2]}));
        t.description = None;
    });
    let t = c.get_task(id).await.unwrap();
    assert_eq!(t.priority, 2.5);
    assert!(t.tags.is_empty());
    assert_eq!(t.queue(), None);
    assert_eq!(t.queue_name.as_deref(), Some(""));
    let listed = c.list_tasks(&ListQuery::new(5)).await.unwrap();
    assert_eq!(listed[0].id, id);
}

/// `n` idle tasks of queue `dev` at priority 10 that cannot run: the even ones assigned to
/// someone, the odd ones blocked by a task of another queue, whose id is returned.
fn stuck_ahead(server: &TinytaskServer, n: usize) -> i64 {
    let blocker = queued(server, "blocker", "other", 0.0);
    server.with_db(|db| {
        for i in 0..n {
            db.insert(&format!("stuck-{i}"), |t| {
                t.queue_name = Some("dev".into());
                t.priority = 10.0;
                if i % 2 == 0 {
                    t.assigned_to = Some("someone".into());
                } else {
                    t.blocked_by_task_id = Some(blocker);
                }
            });
        }
    });
    blocker
}

#[tokio::test]
async fn runnable_tasks_skip_assigned_and_blocked_ones_beyond_the_first_window() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    // 40 higher-priority tasks that cannot run: half assigned, half blocked.
    let blocker = stuck_ahead(&server, 40);
    let free = queued(&server, "free", "dev", 1.0);
    let got = c.runnable_tasks("dev", 1, true).await.unwrap();
    assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), vec![free]);
    let requests = server.requests();
    assert!(requests.len() >= 2, "the window grew: {requests:?}");

    // Blocking ignored: blocked (unassigned) tasks count as runnable.
    let got = c.runnable_tasks("dev", 3, false).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|t| t.is_currently_blocked));

    // The blocker completes: the blocked tasks become runnable on the next read.
    server.mutate_task(blocker, |t| t.status = "complete".into());
    let got = c.runnable_tasks("dev", 25, true).await.unwrap();
    assert_eq!(got.len(), 21);
    assert_eq!(got.last().unwrap().id, free);
}

/// More tasks that cannot run than the largest window: the scan goes on past it (offset pages)
/// until it finds the runnable ones or the queue ends, instead of giving up at the window.
#[tokio::test]
async fn runnable_tasks_are_found_behind_more_stuck_tasks_than_the_largest_window() {
    let server = TinytaskServer::start().await;
    let c = client(&server);
    stuck_ahead(&server, SCAN_WINDOW_MAX as usize + 500);
    let free = queued(&server, "free", "dev", 1.0);
    let got = c.runnable_tasks("dev", 1, true).await.unwrap();
    assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), vec![free]);
    // Every request still has a bounded limit.
    for r in server.requests() {
        let q = r.query.unwrap_or_default();
        assert!(q.contains("limit="), "{q}");
        assert!(!q.contains("limit=0"), "{q}");
    }
    // Nothing runnable at all: the scan ends with the queue.
    server.mutate_task(free, |t| t.assigned_to = Some("someone".into()));
    assert!(c.runnable_tasks("dev", 1, true).await.unwrap().is_empty());

    // A server that ignores `offset` (the contract does not name it) sends the head of the list
    // again: the scan ends at the first page with nothing new, not in a loop of requests.
    server.mutate_task(free, |t| t.assigned_to = None);
    server.with_db(|db| db.ignore_offset = true);
    let before = server.requests().len();
    assert!(c.runnable_tasks("dev", 1, true).await.unwrap().is_empty());
    let offset_pages = server.requests()[before..]
        .iter()
        .filter(|r| r.query.as_deref().unwrap_or_default().contains("offset="))
        .count();
    assert_eq!(offset_pages, 1, "one page of nothing new, then the end");
}

#[tokio::test]
async fn a_repeated_query_key_is_refused_by_the_fake_like_the_real_server() {
    let server = TinytaskServer::start().await;
    let url = format!(
        "{}/api/v1/tasks?status=idle&status=working&limit=5",
        server.url()
    );
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("more than once"));
}

/// A redirect is not followed: a 301/302 would turn a POST into a GET of another URL. The
/// redirect comes back as an error naming its status, and nothing reaches the redirect's target.
#[tokio::test]
async fn a_redirect_is_reported_not_followed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TinytaskServer::start().await;
    let id = queued(&server, "t", "dev", 0.0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = format!("{}/api/v1/tasks/{id}/comments", server.url());
    let redirector = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = sock.write_all(answer.as_bytes()).await;
        }
    });
    let c = Client::with_config(ClientConfig::new(format!("http://{addr}")).retry(fast_retries()))
        .unwrap();
    let err = c.add_comment(id, "hello", "me").await.unwrap_err();
    redirector.abort();
    assert_eq!(err.status(), Some(302), "{err}");
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    assert!(server.comments(id).is_empty());
}
