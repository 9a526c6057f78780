//! The metrics and health HTTP server, served for real on 127.0.0.1:0 and asked with a plain TCP
//! client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tinyscheduler::daemon::{HealthRegistry, HttpServer, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("server answered")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

struct Running {
    addr: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    synced: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
}

/// A server whose readiness depends on a `synced` flag and whose metrics count scrapes.
async fn start() -> Running {
    let health = HealthRegistry::new();
    let synced = Arc::new(AtomicBool::new(false));
    let s = synced.clone();
    health.add_readiness("informers-synced", move || {
        if s.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("waiting for the Task cache".into())
        }
    });
    health.add_liveness("main-loop", || Ok(()));
    let scrapes = Arc::new(AtomicU64::new(0));
    let c = scrapes.clone();
    let server = HttpServer::bind(
        "127.0.0.1:0",
        move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            format!(
                "# HELP tinyscheduler_scrapes_total Scrapes.\n# TYPE tinyscheduler_scrapes_total counter\ntinyscheduler_scrapes_total {n}\n"
            )
        },
        health,
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server.serve(shutdown.wait()));
    Running {
        addr,
        shutdown,
        task,
        synced,
        scrapes,
    }
}

#[tokio::test]
async fn metrics_are_rendered_fresh_on_every_scrape_as_prometheus_text() {
    let r = start().await;
    let a = get(r.addr, "/metrics").await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        a.headers
    );
    assert!(
        a.body.contains("tinyscheduler_scrapes_total 1\n"),
        "{}",
        a.body
    );
    let b = get(r.addr, "/metrics").await;
    assert!(
        b.body.contains("tinyscheduler_scrapes_total 2\n"),
        "{}",
        b.body
    );
    assert_eq!(r.scrapes.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn healthz_says_ok_and_lists_its_checks_when_verbose() {
    let r = start().await;
    let plain = get(r.addr, "/healthz").await;
    assert_eq!((plain.status, plain.body.as_str()), (200, "ok"));
    let verbose = get(r.addr, "/healthz?verbose").await;
    assert_eq!(verbose.status, 200);
    assert_eq!(
        verbose.body,
        "[+]ping ok\n[+]main-loop ok\nhealthz check passed\n"
    );
    let livez = get(r.addr, "/livez").await;
    assert_eq!((livez.status, livez.body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn readyz_fails_with_the_reason_until_the_caches_sync_then_says_ok() {
    let r = start().await;
    let before = get(r.addr, "/readyz").await;
    assert_eq!(before.status, 500);
    assert_eq!(
        before.body,
        "[+]ping ok\n[+]main-loop ok\n[-]informers-synced failed: waiting for the Task cache\nreadyz check failed\n"
    );
    // Liveness is unaffected by readiness.
    assert_eq!(get(r.addr, "/healthz").await.status, 200);
    r.synced.store(true, Ordering::SeqCst);
    let after = get(r.addr, "/readyz").await;
    assert_eq!((after.status, after.body.as_str()), (200, "ok"));
    let verbose = get(r.addr, "/readyz?verbose").await;
    assert_eq!(
        verbose.body,
        "[+]ping ok\n[+]main-loop ok\n[+]informers-synced ok\nreadyz check passed\n"
    );
}

#[tokio::test]
async fn one_check_can_be_asked_by_path_and_excluded_by_query() {
    let r = start().await;
    let one = get(r.addr, "/readyz/informers-synced").await;
    assert_eq!(one.status, 500);
    assert_eq!(
        one.body,
        "internal server error: waiting for the Task cache\n"
    );
    assert_eq!(get(r.addr, "/readyz/ping").await.status, 200);
    assert_eq!(get(r.addr, "/healthz/informers-synced").await.status, 404);
    let excluded = get(r.addr, "/readyz?exclude=informers-synced").await;
    assert_eq!((excluded.status, excluded.body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let r = start().await;
    for path in [
        "/",
        "/metricsx",
        "/debug/pprof",
        "/favicon.ico",
        "//healthz",
        "//readyz/lock",
    ] {
        let x = get(r.addr, path).await;
        assert_eq!(x.status, 404, "{path}");
        assert_eq!(x.body, "404 page not found\n");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let x = request(r.addr, method, "/metrics").await;
        assert_eq!(x.status, 405, "{method}");
        assert_eq!(x.header("allow"), Some("GET, HEAD"));
    }
    let head = request(r.addr, "HEAD", "/healthz").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
}

#[tokio::test]
async fn reqwest_can_scrape_it_too() {
    let r = start().await;
    let resp = reqwest::get(format!("http://{}/metrics", r.addr))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("tinyscheduler_scrapes_total"));
}

#[tokio::test]
async fn shutdown_stops_the_server_and_frees_the_port() {
    let r = start().await;
    assert_eq!(get(r.addr, "/healthz").await.status, 200);
    // An idle keep-alive connection (one request answered, left open) must not hold shutdown up.
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).ends_with("\r\n\r\nok") {
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    r.shutdown.trigger("test");
    tokio::time::timeout(Duration::from_secs(3), r.task)
        .await
        .expect("serve returned promptly")
        .unwrap()
        .unwrap();
    // The server closed the idle connection.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(r.addr).await.is_err());
}

#[tokio::test]
async fn a_taken_port_is_a_clear_bind_error() {
    let r = start().await;
    let err = HttpServer::bind(&r.addr.to_string(), String::new, HealthRegistry::new())
        .await
        .err()
        .expect("second bind fails");
    assert!(
        err.to_string().contains(&format!("listen on {}", r.addr)),
        "{err}"
    );
    let bad = HttpServer::bind("nonsense", String::new, HealthRegistry::new())
        .await
        .err()
        .unwrap();
    assert!(
        bad.to_string().contains("invalid HTTP listen address"),
        "{bad}"
    );
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_wait_and_take_no_descriptor_of_the_server() {
    use tinyscheduler::daemon::http::MAX_CONNECTIONS;
    let r = start().await;
    let before = open_descriptors();
    let mut idle = Vec::new();
    for _ in 0..(MAX_CONNECTIONS * 3) {
        idle.push(TcpStream::connect(r.addr).await.unwrap());
    }
    // Ours (one per client socket) plus the server's, which may not exceed the cap. Watched for a
    // while, as the server accepts in the background.
    let bound = before + idle.len() + MAX_CONNECTIONS + 8;
    for _ in 0..40 {
        let now = open_descriptors();
        assert!(
            now <= bound,
            "{now} descriptors open, at most {bound} expected"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Once the idle clients leave, the server answers again.
    drop(idle);
    assert_eq!(get(r.addr, "/healthz").await.status, 200);
    r.shutdown.trigger("test");
    r.task.await.unwrap().unwrap();
}
