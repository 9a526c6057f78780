//! The typed, async tinytask client.
//!
//! Behaviour every call shares:
//! - a timeout on every request ([`ClientConfig::timeout`], default 10 s);
//! - pooled connections are dropped after 30 s idle, well before the server's 65 s keep-alive
//!   close, so a request never lands on a socket the server is closing;
//! - retries with exponential backoff and full jitter ([`RetryPolicy`], bounded attempts): on
//!   connect errors for every call (nothing was sent), and on 5xx, timeouts and broken answers
//!   only for idempotent calls (GET, PATCH). 4xx is never retried; neither are non-idempotent
//!   POSTs after the request may have reached the server (a comment must not be written twice,
//!   a transfer is a compare-and-set);
//! - redirects are not followed (a 301/302 would turn a POST into a GET): one is an
//!   [`Error::Status`] with its 3xx status;
//! - errors are one [`Error`] naming the request.

use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{Error, Result};
use super::types::{
    Comment, Conditional, Health, ListQuery, NewTask, QueueStats, RemoteTask, TaskId, TaskPatch,
    TaskStatus, Transfer,
};

/// The default tinytask endpoint (the Python scheduler's `TINYSCHEDULER_MCP_ENDPOINT` default).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:3000";
/// The largest window [`Client::scan_idle`] grows to; past it, it reads offset pages this size.
pub const SCAN_WINDOW_MAX: u32 = 2000;

/// Bounded retries with exponential backoff and full jitter.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 = no retries).
    pub max_attempts: u32,
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Largest delay between attempts.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The delay before retry number `retry` (1-based): `base * 2^(retry-1)` capped, then a
    /// random point in its upper half, so many clients do not retry in lock step.
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let d = exp.min(self.cap);
        let half = d / 2;
        let jitter_ns = (half.as_nanos() as u64).max(1);
        half + Duration::from_nanos(fastrand::u64(0..=jitter_ns))
    }
}

/// How the client talks to the server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL of the server, e.g. `http://localhost:3000` (a trailing `/api/v1` or `/mcp` is
    /// dropped).
    pub endpoint: String,
    /// Timeout of each request (connect + answer).
    pub timeout: Duration,
    /// Pooled connections idle longer than this are closed (must stay under the server's 65 s).
    pub pool_idle_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>) -> ClientConfig {
        ClientConfig {
            endpoint: endpoint.into(),
            timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }
}

/// A tinytask REST client. Cheap to clone (shares one connection pool).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    cfg: ClientConfig,
}

/// A raw answer: status, ETag, body.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Vec<u8>,
}

impl Client {
    /// A client for `endpoint` with default settings.
    pub fn new(endpoint: &str) -> Result<Client> {
        Client::with_config(ClientConfig::new(endpoint))
    }

    pub fn with_config(cfg: ClientConfig) -> Result<Client> {
        let base = parse_endpoint(&cfg.endpoint)?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(8)
            // A followed 301/302 turns a POST into a GET of another URL, whose answer may even
            // decode: a comment or transfer would look done with nothing written.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tinyscheduler/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::InvalidEndpoint {
                endpoint: cfg.endpoint.clone(),
                message: e.to_string(),
            })?;
        Ok(Client { http, base, cfg })
    }

    /// The server's base URL as used (no trailing slash).
    pub fn endpoint(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health> {
        let url = self.url(&["health"], false, &[]);
        self.get_json(url).await
    }

    /// `GET /api/v1/tasks` with the query's filters (always with a limit).
    pub async fn list_tasks(&self, q: &ListQuery) -> Result<Vec<RemoteTask>> {
        let url = self.url(&["tasks"], true, &q.pairs());
        self.get_json(url).await
    }

    /// Like [`Client::list_tasks`], but sends `If-None-Match: etag` when given: a poller gets
    /// [`Conditional::NotModified`] (a 304 with no body) when nothing in the answer changed.
    pub async fn list_tasks_if_changed(
        &self,
        q: &ListQuery,
        etag: Option<&str>,
    ) -> Result<Conditional<Vec<RemoteTask>>> {
        let url = self.url(&["tasks"], true, &q.pairs());
        self.get_conditional(url, etag).await
    }

    /// `GET /api/v1/queues/:queue/tasks`: the same list, by queue path (`q.queue_name` is
    /// ignored).
    pub async fn list_queue_tasks(&self, queue: &str, q: &ListQuery) -> Result<Vec<RemoteTask>> {
        let mut q = q.clone();
        q.queue_name = None;
        let url = self.url(&["queues", queue, "tasks"], true, &q.pairs());
        self.get_json(url).await
    }

    /// `GET /api/v1/tasks/:id` (with comments and links). 404 is `Error::Status` with
    /// [`Error::is_not_found`].
    pub async fn get_task(&self, id: TaskId) -> Result<RemoteTask> {
        let url = self.url(&["tasks", &id.to_string()], true, &[]);
        self.get_json(url).await
    }

    /// `PATCH /api/v1/tasks/:id`: unconditional, last write wins. Re-read before claiming.
    pub async fn patch_task(&self, id: TaskId, patch: &TaskPatch) -> Result<RemoteTask> {
        let url = self.url(&["tasks", &id.to_string()], true, &[]);
        self.send_json(Method::PATCH, url, Some(patch), true).await
    }

    /// `POST /api/v1/tasks`: a new task (starts idle).
    pub async fn create_task(&self, task: &NewTask) -> Result<RemoteTask> {
        let url = self.url(&["tasks"], true, &[]);
        self.send_json(Method::POST, url, Some(task), false).await
    }

    /// `POST /api/v1/tasks/:id/comments`.
    pub async fn add_comment(
        &self,
        id: TaskId,
        content: &str,
        created_by: &str,
    ) -> Result<Comment> {
        let url = self.url(&["tasks", &id.to_string(), "comments"], true, &[]);
        let body = serde_json::json!({"content": content, "created_by": created_by});
        self.send_json(Method::POST, url, Some(&body), false).await
    }

    /// `POST /api/v1/tasks/:id/transfer`: a compare-and-set on the assignee; a 400 when the task
    /// is not assigned to `t.current_agent`.
    pub async fn transfer(&self, id: TaskId, t: &Transfer) -> Result<RemoteTask> {
        let url = self.url(&["tasks", &id.to_string(), "transfer"], true, &[]);
        self.send_json(Method::POST, url, Some(t), false).await
    }

    /// `POST /api/v1/agents/:name/signup`: claims the agent's top idle task (404 if none).
    pub async fn signup(&self, agent: &str) -> Result<RemoteTask> {
        let url = self.url(&["agents", agent, "signup"], true, &[]);
        self.send_json::<(), _>(Method::POST, url, None, false)
            .await
    }

    /// `GET /api/v1/queues`: queue names.
    pub async fn list_queues(&self) -> Result<Vec<String>> {
        let url = self.url(&["queues"], true, &[]);
        self.get_json(url).await
    }

    /// `GET /api/v1/queues/:queue/stats`.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        let url = self.url(&["queues", queue, "stats"], true, &[]);
        self.get_json(url).await
    }

    /// `GET /api/v1/queues/:queue/stats` with `If-None-Match`: the cheapest "did anything change
    /// in this queue" check a poller can make.
    pub async fn queue_stats_if_changed(
        &self,
        queue: &str,
        etag: Option<&str>,
    ) -> Result<Conditional<QueueStats>> {
        let url = self.url(&["queues", queue, "stats"], true, &[]);
        self.get_conditional(url, etag).await
    }

    /// Up to `want` tasks of `queue` that a scheduler may claim: idle, unassigned and (when
    /// `respect_blocking`) not currently blocked, in the server's order (priority DESC, created
    /// ASC) with ties broken by id.
    ///
    /// The server cannot filter for "unassigned" or "not blocked", so assigned and blocked
    /// tasks can fill a fixed window. See [`Client::scan_idle`] for how the list is read past
    /// them, up to the end of the queue.
    pub async fn runnable_tasks(
        &self,
        queue: &str,
        want: usize,
        respect_blocking: bool,
    ) -> Result<Vec<RemoteTask>> {
        self.scan_idle(queue, None, want, |t| t.is_runnable(respect_blocking))
            .await
    }

    /// Up to `want` idle tasks of `queue` (assigned to `assigned_to`, when given) that `keep`
    /// accepts, in the server's order with ties broken by id.
    ///
    /// Pages first by *growing a window* from the head of the list: `max(2*want, 16)` idle tasks,
    /// then, while the answer was full but did not yield `want` kept ones, four times as many, up
    /// to [`SCAN_WINDOW_MAX`]. A window starting at the head cannot skip or repeat a task that
    /// changes state between requests, and a filtered list is cheap on the server. Past the
    /// largest window it goes on with `offset` pages of [`SCAN_WINDOW_MAX`] (accepted by the
    /// tinytask 2.0 server's `GET /tasks`), until enough are found or a page comes back short (the
    /// end of the queue): tasks that cannot run, however many, never hide one that can. A task
    /// seen twice (the list shifted) counts once; one the shift skipped is found by a later scan.
    pub async fn scan_idle(
        &self,
        queue: &str,
        assigned_to: Option<&str>,
        want: usize,
        keep: impl Fn(&RemoteTask) -> bool,
    ) -> Result<Vec<RemoteTask>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let query = |limit: u32| {
            let q = ListQuery::new(limit).queue(queue).status(TaskStatus::Idle);
            match assigned_to {
                Some(a) => q.assigned_to(a),
                None => q,
            }
        };
        let mut window = ((want as u32).saturating_mul(2)).clamp(16, SCAN_WINDOW_MAX);
        let mut found: Vec<RemoteTask>;
        let mut full;
        // Every task any page listed: a page that lists none that is new ends the scan, also on a
        // server that ignores `offset` (the contract does not name it) and sends the head again.
        let mut listed: std::collections::HashSet<TaskId> = Default::default();
        loop {
            let page = self.list_tasks(&query(window)).await?;
            full = page.len() as u32 >= window;
            listed.extend(page.iter().map(|t| t.id));
            found = page.into_iter().filter(|t| keep(t)).collect();
            if found.len() >= want || !full || window >= SCAN_WINDOW_MAX {
                break;
            }
            window = window.saturating_mul(4).min(SCAN_WINDOW_MAX);
        }
        let mut seen: std::collections::HashSet<TaskId> = found.iter().map(|t| t.id).collect();
        let mut offset = window;
        while full && found.len() < want {
            let page = self
                .list_tasks(&query(SCAN_WINDOW_MAX).offset(offset))
                .await?;
            full = page.len() as u32 >= SCAN_WINDOW_MAX;
            offset = offset.saturating_add(SCAN_WINDOW_MAX);
            let before = listed.len();
            listed.extend(page.iter().map(|t| t.id));
            if listed.len() == before {
                break;
            }
            found.extend(page.into_iter().filter(|t| keep(t) && seen.insert(t.id)));
        }
        sort_like_server(&mut found);
        found.truncate(want);
        Ok(found)
    }

    // ---- plumbing ----

    fn url(&self, segments: &[&str], api: bool, query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        {
            let mut p = url
                .path_segments_mut()
                .expect("an http(s) URL has path segments");
            p.pop_if_empty();
            if api {
                p.push("api").push("v1");
            }
            for s in segments {
                p.push(s);
            }
        }
        if !query.is_empty() {
            let mut qp = url.query_pairs_mut();
            for (k, v) in query {
                qp.append_pair(k, v);
            }
        }
        url
    }

    async fn get_json<T: DeserializeOwned>(&self, url: Url) -> Result<T> {
        let desc = format!("GET {url}");
        let a = self
            .execute::<()>(Method::GET, url, None, None, true)
            .await?;
        check_status(&desc, &a)?;
        decode(&desc, &a.body)
    }

    async fn get_conditional<T: DeserializeOwned>(
        &self,
        url: Url,
        etag: Option<&str>,
    ) -> Result<Conditional<T>> {
        let desc = format!("GET {url}");
        let a = self
            .execute::<()>(Method::GET, url, None, etag, true)
            .await?;
        if a.status == StatusCode::NOT_MODIFIED {
            return Ok(Conditional::NotModified);
        }
        check_status(&desc, &a)?;
        Ok(Conditional::Modified {
            value: decode(&desc, &a.body)?,
            etag: a.etag,
        })
    }

    async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<T> {
        let desc = format!("{method} {url}");
        let a = self.execute(method, url, body, None, idempotent).await?;
        check_status(&desc, &a)?;
        decode(&desc, &a.body)
    }

    /// Sends with retries; answers any status (the caller judges 4xx), except that a 5xx left
    /// after the last attempt is returned as an error.
    async fn execute<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        if_none_match: Option<&str>,
        idempotent: bool,
    ) -> Result<Answer> {
        let desc = format!("{method} {url}");
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| Error::Transport {
                request: desc.clone(),
                message: format!("cannot encode the request body: {e}"),
            })?),
            None => None,
        };
        let attempts = self.cfg.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut rb = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.cfg.timeout);
            if let Some(b) = &body {
                rb = rb
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(b.clone());
            }
            if let Some(tag) = if_none_match {
                rb = rb.header(IF_NONE_MATCH, tag);
            }
            let outcome = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let etag = resp
                        .headers()
                        .get(ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match resp.bytes().await {
                        Ok(b) => Ok(Answer {
                            status,
                            etag,
                            body: b.to_vec(),
                        }),
                        Err(e) => Err(self.transport_error(&desc, e)),
                    }
                }
                Err(e) => Err(self.transport_error(&desc, e)),
            };
            let retryable = match &outcome {
                Ok(a) => a.status.is_server_error() && idempotent,
                Err(Error::Connect { .. }) => true,
                Err(Error::Timeout { .. } | Error::Transport { .. }) => idempotent,
                Err(_) => false,
            };
            if retryable && attempt < attempts {
                let d = self.cfg.retry.delay(attempt);
                tracing::debug!(request = %desc, attempt, delay = ?d, "tinytask request failed, retrying");
                tokio::time::sleep(d).await;
                continue;
            }
            return outcome;
        }
    }

    fn transport_error(&self, desc: &str, e: reqwest::Error) -> Error {
        let message = error_chain(&e);
        if e.is_timeout() {
            Error::Timeout {
                request: desc.to_string(),
                after: self.cfg.timeout,
            }
        } else if e.is_connect() {
            Error::Connect {
                request: desc.to_string(),
                message,
            }
        } else {
            Error::Transport {
                request: desc.to_string(),
                message,
            }
        }
    }
}

/// Stable order for equal (priority, created_at): by id, as the server leaves ties unordered.
fn sort_like_server(tasks: &mut [RemoteTask]) {
    tasks.sort_by(|a, b| {
        b.priority
            .total_cmp(&a.priority)
            .then_with(|| a.created_at.cmp(&b.created_at))
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// `endpoint` as the client uses it: parsed, a trailing `/api/v1` or `/mcp` dropped, no trailing
/// slash (`http://h:3000/mcp/` → `http://h:3000`); `None` when it is not a usable endpoint.
pub fn normalize_endpoint(endpoint: &str) -> Option<String> {
    parse_endpoint(endpoint)
        .ok()
        .map(|u| u.as_str().trim_end_matches('/').to_string())
}

fn parse_endpoint(endpoint: &str) -> Result<Url> {
    let invalid = |m: &str| Error::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        message: m.to_string(),
    };
    if crate::resources::validate::has_credentials(endpoint.trim()) {
        // The error must not repeat them either.
        return Err(Error::InvalidEndpoint {
            endpoint: "(a URL with a user name or password)".into(),
            message: crate::resources::validate::CREDENTIALS.into(),
        });
    }
    let mut url = Url::parse(endpoint.trim()).map_err(|e| invalid(&e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid("must be an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    let path = url.path().trim_end_matches('/').to_string();
    let path = path
        .strip_suffix("/api/v1")
        .or_else(|| path.strip_suffix("/mcp"))
        .unwrap_or(&path)
        .to_string();
    url.set_path(if path.is_empty() { "/" } else { &path });
    Ok(url)
}

fn check_status(desc: &str, a: &Answer) -> Result<()> {
    if a.status.is_success() {
        return Ok(());
    }
    let message = serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&a.body).trim().to_string();
            if text.is_empty() {
                a.status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_string()
            } else {
                text.chars().take(200).collect()
            }
        });
    Err(Error::Status {
        request: desc.to_string(),
        status: a.status.as_u16(),
        message,
    })
}

fn decode<T: DeserializeOwned>(desc: &str, body: &[u8]) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Error::Decode {
            request: desc.to_string(),
            message: if path == "." {
                inner.to_string()
            } else {
                format!("at {path}: {inner}")
            },
        }
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_lose_a_trailing_api_prefix_and_urls_are_built_under_api_v1() {
        let c = Client::new("http://127.0.0.1:3000/api/v1/").unwrap();
        assert_eq!(c.endpoint(), "http://127.0.0.1:3000");
        let u = c.url(&["queues", "a b", "stats"], true, &[]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:3000/api/v1/queues/a%20b/stats"
        );
        let c = Client::new("http://h:1/prefix").unwrap();
        assert_eq!(
            c.url(&["health"], false, &[]).as_str(),
            "http://h:1/prefix/health"
        );
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("not a url").is_err());
    }

    #[test]
    fn an_endpoint_with_credentials_is_refused_without_repeating_them() {
        for ep in ["http://user:s3cret@h:3000", "https://s3cret@h/api/v1"] {
            let e = Client::new(ep).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            assert!(e.contains("user name or password"), "{e}");
        }
        assert!(
            Client::new("http://h:3000/a@b").is_ok(),
            "an @ in the path is no user"
        );
    }

    #[test]
    fn retry_delays_grow_exponentially_with_jitter_and_stay_under_the_cap() {
        let r = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(800),
        };
        for _ in 0..50 {
            let d1 = r.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = r.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(r.delay(30) <= Duration::from_millis(800));
        }
    }
}
