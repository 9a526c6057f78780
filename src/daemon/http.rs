//! The daemon's HTTP endpoint: Prometheus `/metrics` and apiserver-style `/healthz`, `/livez`,
//! `/readyz` (plus `/<endpoint>/<check>` for one check). Off unless an address is configured
//! (`run --daemon --http 127.0.0.1:9464` or `TINYSCHEDULER_HTTP_ADDR`).
//!
//! Plain HTTP/1.1 on hyper 1, GET (and HEAD) only: anything else is 405, unknown paths 404.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::health::{Endpoint, HealthRegistry};

/// The Prometheus text exposition format's content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long open connections get to finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the listen backlog. A scraper and a health probe or
/// two need a handful.
pub const MAX_CONNECTIONS: usize = 64;

/// Renders the metrics page on each scrape (e.g. `move || metrics.render()`).
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

struct Routes {
    metrics: MetricsFn,
    health: HealthRegistry,
}

/// A bound, not yet serving, HTTP server. Binding first lets the daemon fail at startup with a
/// clear error when the port is taken, and lets tests bind port 0 and ask for the address.
pub struct HttpServer {
    listener: TcpListener,
    routes: Arc<Routes>,
}

/// Parses a listen address: `HOST:PORT`, `[V6]:PORT`, or `:PORT` for every interface.
pub fn parse_listen_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    match full.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(full),
        _ => Err(format!(
            "invalid HTTP listen address {s:?}: want HOST:PORT, e.g. 127.0.0.1:9464"
        )),
    }
}

/// Binds `addr` (see [`parse_listen_addr`]) for a server made later with [`HttpServer::on`]: the
/// daemon binds before it starts its controllers, so a taken port stops it with nothing started.
pub async fn listen(addr: &str) -> io::Result<TcpListener> {
    let addr =
        parse_listen_addr(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TcpListener::bind(&addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("listen on {addr}: {e}")))
}

impl HttpServer {
    /// Binds `addr` (see [`parse_listen_addr`]); `metrics` renders `/metrics`, `health` answers
    /// the health endpoints.
    pub async fn bind(
        addr: &str,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        health: HealthRegistry,
    ) -> io::Result<HttpServer> {
        Ok(HttpServer::on(listen(addr).await?, metrics, health))
    }

    /// The server on a listener [`listen`] bound earlier.
    pub fn on(
        listener: TcpListener,
        metrics: impl Fn() -> String + Send + Sync + 'static,
        health: HealthRegistry,
    ) -> HttpServer {
        HttpServer {
            listener,
            routes: Arc::new(Routes {
                metrics: Arc::new(metrics),
                health,
            }),
        }
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives open connections
    /// [`SHUTDOWN_GRACE`] to finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> io::Result<()> {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tracing::info!(address = %self.listener.local_addr()?, "serving /metrics, /healthz, /livez and /readyz");
        tokio::pin!(shutdown);
        // Each connection is a descriptor until it ends (an idle one after the header timeout):
        // without a cap, anyone who can connect could take every descriptor the scheduler has
        // and stop it from reading its store. Past the cap, connections wait in the backlog.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot,
                _ = &mut shutdown => break,
            };
            // The semaphore is never closed.
            let Ok(slot) = slot else { break };
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let routes = self.routes.clone();
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let routes = routes.clone();
                            async move { Ok::<_, Infallible>(routes.handle(&req)) }
                        });
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning, and say so once a
                        // minute rather than ten times a second.
                        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            tracing::warn!(error = %e, "HTTP accept failed");
                            last_warning = Some(std::time::Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        drop(self.listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
                tracing::warn!("HTTP connections still open after the shutdown grace; dropping them");
            }
        }
        Ok(())
    }
}

impl Routes {
    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let path = req.uri().path();
        if path == "/metrics" {
            return match catch_unwind(AssertUnwindSafe(|| (self.metrics)())) {
                Ok(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rendering metrics panicked\n".into(),
                ),
            };
        }
        let mut segments = path.strip_prefix('/').unwrap_or(path).splitn(2, '/');
        let endpoint = segments.next().and_then(Endpoint::from_name);
        let check = segments.next().filter(|s| !s.is_empty());
        let Some(endpoint) = endpoint else {
            return not_found();
        };
        let (verbose, exclude) = parse_query(req.uri().query().unwrap_or(""));
        let report = match check {
            None => self.health.report(endpoint, verbose, &exclude),
            Some(name) => match self.health.report_one(endpoint, name) {
                Some(r) => r,
                None => return not_found(),
            },
        };
        let code = if report.healthy {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        text(code, report.body)
    }
}

/// `?verbose` (any value) and repeated `?exclude=NAME`.
fn parse_query(q: &str) -> (bool, Vec<String>) {
    let mut verbose = false;
    let mut exclude = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "verbose" => verbose = v != "false" && v != "0",
            "exclude" if !v.is_empty() => exclude.push(v.to_string()),
            _ => {}
        }
    }
    (verbose, exclude)
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn not_found() -> Response<Full<Bytes>> {
    text(StatusCode::NOT_FOUND, "404 page not found\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_accept_host_port_and_bare_port() {
        assert_eq!(
            parse_listen_addr("127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464"
        );
        assert_eq!(parse_listen_addr(":9464").unwrap(), "0.0.0.0:9464");
        assert_eq!(parse_listen_addr("[::1]:80").unwrap(), "[::1]:80");
        assert!(parse_listen_addr("9464").is_err());
        assert!(parse_listen_addr("localhost:http").is_err());
    }

    #[test]
    fn the_query_string_gives_verbose_and_excludes() {
        assert_eq!(parse_query(""), (false, vec![]));
        assert_eq!(parse_query("verbose"), (true, vec![]));
        assert_eq!(
            parse_query("verbose=1&exclude=a&exclude=b"),
            (true, vec!["a".to_string(), "b".to_string()])
        );
    }
}
