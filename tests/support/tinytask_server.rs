//! A faithful, in-process fake of the tinytask 2.0 REST server for tests (hyper 1, tokio), bound
//! to 127.0.0.1 on a free port.
//!
//! What it implements, with the real server's quirks (see `/work/shared/tinytask-api.md`):
//! - `GET /health` → `{"status":"healthy","timestamp":…}`.
//! - `GET /api/v1/tasks` and `GET /api/v1/queues/:q/tasks`: filters `queue_name`, `status`
//!   (comma-separated, each validated), `assigned_to` (exact match), `include_archived`
//!   (exactly `true`/`false`), `limit`/`offset` (non-negative integers; **no default limit**, 0
//!   means none); a repeated query key is a 400; order `priority DESC, created_at ASC`, then id.
//! - `GET /api/v1/tasks/:id` with `comments` and `links`; 404 `Task N not found`; 400 for a
//!   non-integer id. `is_currently_blocked` is computed on every read (blocker exists and is not
//!   `complete`).
//! - `POST /api/v1/tasks` (201; `title` and `created_by` required; starts idle),
//!   `PATCH /api/v1/tasks/:id` (any of the fields, unconditional, last write wins;
//!   `previous_assigned_to` set when the assignee changes; `assigned_to: ""` or null unassigns;
//!   `tags: null` stores null), `POST /api/v1/tasks/:id/comments` (201),
//!   `GET /api/v1/tasks/:id/comments`, `POST /api/v1/tasks/:id/transfer` (compare-and-set on the
//!   assignee: 400 unless `assigned_to == current_agent`; only idle/working tasks; sets idle,
//!   records `previous_assigned_to` and a handoff comment), `POST /api/v1/agents/:name/signup`
//!   (claims the agent's top idle task, ignoring blocking; 404 when none), `GET /api/v1/queues`
//!   (array of names), `GET /api/v1/queues/:q/stats`.
//! - Errors are `{"error": "..."}`: 404 for "not found" and unknown paths, 400 otherwise; bodies
//!   over 100 KB get a 500. Creates answer 201, everything else 200.
//! - GETs answered 200 carry a weak `ETag` over the body; a matching `If-None-Match` gets 304.
//! - Timestamps are UTC with one-second resolution.
//!
//! Test hooks: [`TinytaskServer::stop`] / [`TinytaskServer::restart`] on the same port (an
//! outage: the listener and every open connection are closed), [`TinytaskServer::fail_next`]
//! (N error statuses), [`TinytaskServer::fail_every_matching`] (an error status for every request
//! that matches, until [`TinytaskServer::stop_failing`]), [`TinytaskServer::malformed_next`] (N truncated JSON bodies),
//! [`TinytaskServer::delay_next`] (slow answers), [`TinytaskServer::before_next_request`] (mutate
//! state between two requests, e.g. reassign a task a client just read), direct state access
//! ([`TinytaskServer::with_db`], [`TinytaskServer::insert`], [`TinytaskServer::mutate_task`]),
//! and a log of every request ([`TinytaskServer::requests`]). Injected faults change no state.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Largest request body the server accepts (the real one answers 500 above ~100 KB).
pub const MAX_BODY: usize = 100 * 1024;

/// A task as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeTask {
    pub id: i64,
    pub title: String,
    pub description: Option<String>,
    /// `idle`, `working` or `complete`.
    pub status: String,
    pub assigned_to: Option<String>,
    pub previous_assigned_to: Option<String>,
    pub created_by: Option<String>,
    /// Serialized as an integer when it has no fraction.
    pub priority: f64,
    /// `None` is serialized as `null`.
    pub tags: Option<Vec<String>>,
    pub parent_task_id: Option<i64>,
    pub queue_name: Option<String>,
    pub blocked_by_task_id: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
    pub archived_at: Option<String>,
    /// Extra fields sent as they are (to test that clients ignore unknown fields).
    pub extra: Map<String, Value>,
}

impl FakeTask {
    fn new(id: i64, title: &str) -> FakeTask {
        let now = now();
        FakeTask {
            id,
            title: title.to_string(),
            description: None,
            status: "idle".into(),
            assigned_to: None,
            previous_assigned_to: None,
            created_by: Some("test".into()),
            priority: 0.0,
            tags: Some(Vec::new()),
            parent_task_id: None,
            queue_name: None,
            blocked_by_task_id: None,
            created_at: now.clone(),
            updated_at: now,
            archived_at: None,
            extra: Map::new(),
        }
    }
}

/// A comment as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeComment {
    pub id: i64,
    pub task_id: i64,
    pub content: String,
    pub created_by: Option<String>,
    pub created_at: String,
}

/// The server's state.
#[derive(Default, Debug)]
pub struct Db {
    pub tasks: BTreeMap<i64, FakeTask>,
    pub comments: Vec<FakeComment>,
    /// Lists answer from the head whatever their `offset` (which the contract does not name), as
    /// a server without it would.
    pub ignore_offset: bool,
    next_task: i64,
    next_comment: i64,
}

impl Db {
    /// Adds a task with the defaults of `POST /tasks`, as changed by `f`; returns its id.
    pub fn insert(&mut self, title: &str, f: impl FnOnce(&mut FakeTask)) -> i64 {
        self.next_task += 1;
        let id = self.next_task;
        let mut t = FakeTask::new(id, title);
        f(&mut t);
        t.id = id;
        self.tasks.insert(id, t);
        id
    }

    pub fn task(&self, id: i64) -> Option<&FakeTask> {
        self.tasks.get(&id)
    }

    fn is_blocked(&self, t: &FakeTask) -> bool {
        t.blocked_by_task_id
            .and_then(|b| self.tasks.get(&b))
            .is_some_and(|b| b.status != "complete")
    }

    fn task_json(&self, t: &FakeTask, with_relations: bool) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(t.id));
        m.insert("title".into(), json!(t.title));
        m.insert("description".into(), json!(t.description));
        m.insert("status".into(), json!(t.status));
        m.insert("assigned_to".into(), json!(t.assigned_to));
        m.insert("previous_assigned_to".into(), json!(t.previous_assigned_to));
        m.insert("created_by".into(), json!(t.created_by));
        m.insert("priority".into(), number(t.priority));
        m.insert("tags".into(), json!(t.tags));
        m.insert("parent_task_id".into(), json!(t.parent_task_id));
        m.insert("queue_name".into(), json!(t.queue_name));
        m.insert("blocked_by_task_id".into(), json!(t.blocked_by_task_id));
        m.insert("is_currently_blocked".into(), json!(self.is_blocked(t)));
        m.insert("created_at".into(), json!(t.created_at));
        m.insert("updated_at".into(), json!(t.updated_at));
        m.insert("archived_at".into(), json!(t.archived_at));
        for (k, v) in &t.extra {
            m.insert(k.clone(), v.clone());
        }
        if with_relations {
            let comments: Vec<Value> = self
                .comments
                .iter()
                .filter(|c| c.task_id == t.id)
                .map(comment_json)
                .collect();
            m.insert("comments".into(), Value::Array(comments));
            m.insert("links".into(), json!([]));
        }
        Value::Object(m)
    }

    fn add_comment(&mut self, task_id: i64, content: &str, by: Option<String>) -> FakeComment {
        self.next_comment += 1;
        let c = FakeComment {
            id: self.next_comment,
            task_id,
            content: content.to_string(),
            created_by: by,
            created_at: now(),
        };
        self.comments.push(c.clone());
        c
    }
}

/// One request as the server saw it, with the status it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub if_none_match: Option<String>,
    pub body: String,
    pub status: u16,
}

type Hook = Box<dyn FnOnce(&mut Db) + Send>;

#[derive(Default)]
struct Faults {
    fail: VecDeque<u16>,
    /// (method, path, body substring, status): the first request that matches gets the status.
    fail_matching: Vec<(String, String, String, u16)>,
    /// (method, path, body substring, status): every request that matches gets the status, until
    /// [`TinytaskServer::stop_failing`].
    fail_every_matching: Vec<(String, String, String, u16)>,
    /// (method, path, body substring, delay): the first request that matches is answered late.
    delay_matching: Vec<(String, String, String, Duration)>,
    malformed: usize,
    delays: VecDeque<Duration>,
    before_next: Vec<Hook>,
}

#[derive(Default)]
struct Shared {
    db: Mutex<Db>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RecordedRequest>>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The fake server. Dropping it stops it.
pub struct TinytaskServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl TinytaskServer {
    /// Starts on 127.0.0.1 on a free port.
    pub async fn start() -> TinytaskServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let running = Some(serve(listener, shared.clone()));
        TinytaskServer {
            shared,
            addr,
            running,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and closes every open connection (state is kept).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }

    /// Listens again on the same port, with the same state.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.running = Some(serve(listener, self.shared.clone()));
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The next `n` requests get `status` with `{"error": "injected failure"}`.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut f = self.shared.faults.lock().unwrap();
        f.fail.extend(std::iter::repeat_n(status, n));
    }

    /// The first request with this method and path whose body contains `body` gets `status`
    /// with `{"error": "injected failure"}` (once).
    pub fn fail_matching(&self, method: &str, path: &str, body: &str, status: u16) {
        self.shared.faults.lock().unwrap().fail_matching.push((
            method.into(),
            path.into(),
            body.into(),
            status,
        ));
    }

    /// Every request with this method and path whose body contains `body` gets `status` with
    /// `{"error": "injected failure"}`, until [`TinytaskServer::stop_failing`].
    pub fn fail_every_matching(&self, method: &str, path: &str, body: &str, status: u16) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .fail_every_matching
            .push((method.into(), path.into(), body.into(), status));
    }

    /// Ends every [`TinytaskServer::fail_every_matching`].
    pub fn stop_failing(&self) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .fail_every_matching
            .clear();
    }

    /// The first request with this method and path whose body contains `body` is answered after
    /// `d` (once).
    pub fn delay_matching(&self, method: &str, path: &str, body: &str, d: Duration) {
        self.shared.faults.lock().unwrap().delay_matching.push((
            method.into(),
            path.into(),
            body.into(),
            d,
        ));
    }

    /// The next `n` requests get 200 with a truncated JSON body.
    pub fn malformed_next(&self, n: usize) {
        self.shared.faults.lock().unwrap().malformed += n;
    }

    /// The next `n` requests are answered after `d`.
    pub fn delay_next(&self, n: usize, d: Duration) {
        let mut f = self.shared.faults.lock().unwrap();
        f.delays.extend(std::iter::repeat_n(d, n));
    }

    /// Runs `f` on the state just before the next request is handled.
    pub fn before_next_request(&self, f: impl FnOnce(&mut Db) + Send + 'static) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .before_next
            .push(Box::new(f));
    }

    /// Reads or changes the state directly.
    pub fn with_db<R>(&self, f: impl FnOnce(&mut Db) -> R) -> R {
        f(&mut self.shared.db.lock().unwrap())
    }

    /// Adds a task (defaults of `POST /tasks`, changed by `f`); returns its id.
    pub fn insert(&self, title: &str, f: impl FnOnce(&mut FakeTask)) -> i64 {
        self.with_db(|db| db.insert(title, f))
    }

    /// Changes a stored task (panics when it does not exist).
    pub fn mutate_task(&self, id: i64, f: impl FnOnce(&mut FakeTask)) {
        self.with_db(|db| f(db.tasks.get_mut(&id).expect("no such task")));
    }

    pub fn task(&self, id: i64) -> Option<FakeTask> {
        self.with_db(|db| db.tasks.get(&id).cloned())
    }

    pub fn comments(&self, id: i64) -> Vec<FakeComment> {
        self.with_db(|db| {
            db.comments
                .iter()
                .filter(|c| c.task_id == id)
                .cloned()
                .collect()
        })
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

impl Drop for TinytaskServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }
}

fn serve(listener: TcpListener, shared: Arc<Shared>) -> Running {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(shared, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    });
    Running { stop, task }
}

/// Takes the first fault set for this method and path whose body substring the request has.
fn take_matching<T>(
    faults: &mut Vec<(String, String, String, T)>,
    method: &str,
    path: &str,
    body: &str,
) -> Option<T> {
    let i = faults
        .iter()
        .position(|(m, p, b, _)| m == method && p == path && body.contains(b.as_str()))?;
    Some(faults.remove(i).3)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let if_none_match = req
        .headers()
        .get(hyper::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let (delay, fail, malformed, hooks) = {
        let mut f = shared.faults.lock().unwrap();
        let text = String::from_utf8_lossy(&body);
        let delay = take_matching(&mut f.delay_matching, &method, &path, &text)
            .or_else(|| f.delays.pop_front());
        let fail = take_matching(&mut f.fail_matching, &method, &path, &text)
            .or_else(|| {
                f.fail_every_matching
                    .iter()
                    .find(|(m, p, b, _)| *m == method && *p == path && text.contains(b.as_str()))
                    .map(|x| x.3)
            })
            .or_else(|| f.fail.pop_front());
        let malformed = if fail.is_none() && f.malformed > 0 {
            f.malformed -= 1;
            true
        } else {
            false
        };
        (delay, fail, malformed, std::mem::take(&mut f.before_next))
    };
    if !hooks.is_empty() {
        let mut db = shared.db.lock().unwrap();
        for h in hooks {
            h(&mut db);
        }
    }
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let (status, out, etag) = if let Some(code) = fail {
        let s = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (s, error_body("injected failure"), None)
    } else if malformed {
        (
            StatusCode::OK,
            Bytes::from_static(b"{\"id\": 1, \"title\": "),
            None,
        )
    } else if body.len() > MAX_BODY {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            error_body("request entity too large"),
            None,
        )
    } else {
        let (status, value) = {
            let mut db = shared.db.lock().unwrap();
            route(&mut db, &method, &path, query.as_deref(), &body)
        };
        let bytes = Bytes::from(serde_json::to_vec(&value).unwrap());
        if method == "GET" && status == StatusCode::OK {
            let tag = weak_etag(&bytes);
            if if_none_match.as_deref() == Some(tag.as_str()) {
                (StatusCode::NOT_MODIFIED, Bytes::new(), Some(tag))
            } else {
                (status, bytes, Some(tag))
            }
        } else {
            (status, bytes, None)
        }
    };
    shared.log.lock().unwrap().push(RecordedRequest {
        method,
        path,
        query,
        if_none_match,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: status.as_u16(),
    });
    let mut resp = Response::builder().status(status);
    if status != StatusCode::NOT_MODIFIED {
        resp = resp.header("content-type", "application/json; charset=utf-8");
    }
    if let Some(t) = etag {
        resp = resp.header("etag", t);
    }
    resp.body(Full::new(out)).unwrap()
}

type Answer = (StatusCode, Value);

fn ok(v: Value) -> Answer {
    (StatusCode::OK, v)
}
fn bad(msg: impl Into<String>) -> Answer {
    (StatusCode::BAD_REQUEST, json!({"error": msg.into()}))
}
fn not_found(msg: impl Into<String>) -> Answer {
    (StatusCode::NOT_FOUND, json!({"error": msg.into()}))
}
fn error_body(msg: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({"error": msg})).unwrap())
}

fn route(db: &mut Db, method: &str, path: &str, query: Option<&str>, body: &[u8]) -> Answer {
    let q = match parse_query(query) {
        Ok(q) => q,
        Err(a) => return a,
    };
    if method == "GET" && path == "/health" {
        return ok(json!({"status": "healthy", "timestamp": now()}));
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return not_found("Not found");
    };
    let segs: Vec<String> = rest.split('/').map(percent_decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let body = || -> Result<Map<String, Value>, Answer> {
        if body.is_empty() {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(bad("request body must be a JSON object")),
            Err(e) => Err(bad(format!("invalid JSON: {e}"))),
        }
    };
    macro_rules! body {
        () => {
            match body() {
                Ok(b) => b,
                Err(a) => return a,
            }
        };
    }
    match (method, segs.as_slice()) {
        ("GET", ["tasks"]) => list(db, &q, None),
        ("POST", ["tasks"]) => create(db, &body!()),
        ("GET", ["tasks", id]) => with_id(id, |id| match db.tasks.get(&id) {
            Some(t) => ok(db.task_json(t, true)),
            None => not_found(format!("Task {id} not found")),
        }),
        ("PATCH", ["tasks", id]) => {
            let b = body!();
            with_id(id, |id| patch(db, id, &b))
        }
        ("POST", ["tasks", id, "comments"]) => {
            let b = body!();
            with_id(id, |id| comment(db, id, &b))
        }
        ("GET", ["tasks", id, "comments"]) => with_id(id, |id| {
            let cs: Vec<Value> = db
                .comments
                .iter()
                .filter(|c| c.task_id == id)
                .map(comment_json)
                .collect();
            ok(Value::Array(cs))
        }),
        ("POST", ["tasks", id, "transfer"]) => {
            let b = body!();
            with_id(id, |id| transfer(db, id, &b))
        }
        ("POST", ["agents", name, "signup"]) => signup(db, name),
        ("GET", ["queues"]) => {
            let names: BTreeSet<&str> = db
                .tasks
                .values()
                .filter(|t| t.archived_at.is_none())
                .filter_map(|t| t.queue_name.as_deref())
                .filter(|q| !q.is_empty())
                .collect();
            ok(json!(names))
        }
        ("GET", ["queues", name, "stats"]) => stats(db, name),
        ("GET", ["queues", name, "tasks"]) => list(db, &q, Some(name)),
        _ => not_found("Not found"),
    }
}

fn with_id(raw: &str, f: impl FnOnce(i64) -> Answer) -> Answer {
    match raw.parse::<i64>() {
        Ok(id) => f(id),
        Err(_) => bad(format!("Invalid task ID: {raw}")),
    }
}

fn list(db: &Db, q: &BTreeMap<String, String>, queue: Option<&str>) -> Answer {
    let mut statuses = None;
    if let Some(s) = q.get("status") {
        let mut set = BTreeSet::new();
        for part in s.split(',') {
            if !matches!(part, "idle" | "working" | "complete") {
                return bad(format!("Invalid status: {part}"));
            }
            set.insert(part.to_string());
        }
        statuses = Some(set);
    }
    let int = |k: &str| -> Result<Option<usize>, Answer> {
        match q.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| bad(format!("{k} must be a non-negative integer"))),
        }
    };
    let boolean = |k: &str| -> Result<bool, Answer> {
        match q.get(k).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(bad(format!("{k} must be true or false, got {v}"))),
        }
    };
    let (limit, offset, archived) = match (int("limit"), int("offset"), boolean("include_archived"))
    {
        (Ok(l), Ok(o), Ok(a)) => (l, o, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let queue = queue
        .map(str::to_string)
        .or_else(|| q.get("queue_name").cloned());
    let mut tasks: Vec<&FakeTask> = db
        .tasks
        .values()
        .filter(|t| archived || t.archived_at.is_none())
        .filter(|t| {
            queue
                .as_ref()
                .is_none_or(|qn| t.queue_name.as_ref() == Some(qn))
        })
        .filter(|t| statuses.as_ref().is_none_or(|s| s.contains(&t.status)))
        .filter(|t| {
            q.get("assigned_to")
                .is_none_or(|a| t.assigned_to.as_ref() == Some(a))
        })
        .collect();
    tasks.sort_by(|a, b| {
        b.priority
            .total_cmp(&a.priority)
            .then_with(|| a.created_at.cmp(&b.created_at))
            .then_with(|| a.id.cmp(&b.id))
    });
    let offset = offset.filter(|_| !db.ignore_offset).unwrap_or(0);
    let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let out: Vec<Value> = tasks
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|t| db.task_json(t, false))
        .collect();
    ok(Value::Array(out))
}

fn opt_string(b: &Map<String, Value>, k: &str) -> Result<Option<Option<String>>, Answer> {
    match b.get(k) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
        Some(_) => Err(bad(format!("{k} must be a string"))),
    }
}

fn create(db: &mut Db, b: &Map<String, Value>) -> Answer {
    let title = b.get("title").and_then(Value::as_str).unwrap_or("").trim();
    if title.is_empty() {
        return bad("Task title is required");
    }
    let Some(created_by) = b.get("created_by").and_then(Value::as_str) else {
        return bad("created_by is required");
    };
    if b.get("priority").is_some_and(|p| !p.is_number()) {
        return bad("priority must be a number");
    }
    if let Some(p) = b.get("blocked_by_task_id").and_then(Value::as_i64) {
        if !db.tasks.contains_key(&p) {
            return not_found(format!("Blocking task not found: {p}"));
        }
    }
    let id = db.insert(title, |t| {
        t.created_by = Some(created_by.to_string());
        t.description = b
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string);
        t.assigned_to = b
            .get("assigned_to")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        t.priority = b.get("priority").and_then(Value::as_f64).unwrap_or(0.0);
        t.tags = Some(
            b.get("tags")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        );
        t.queue_name = b
            .get("queue_name")
            .and_then(Value::as_str)
            .map(str::to_string);
        t.blocked_by_task_id = b.get("blocked_by_task_id").and_then(Value::as_i64);
        t.parent_task_id = b.get("parent_task_id").and_then(Value::as_i64);
    });
    (StatusCode::CREATED, db.task_json(&db.tasks[&id], false))
}

fn patch(db: &mut Db, id: i64, b: &Map<String, Value>) -> Answer {
    let Some(existing) = db.tasks.get(&id).cloned() else {
        return not_found(format!("Task not found: {id}"));
    };
    let mut t = existing.clone();
    if let Some(s) = b.get("status") {
        match s.as_str() {
            Some(v @ ("idle" | "working" | "complete")) => t.status = v.to_string(),
            _ => return bad(format!("Invalid status: {s}")),
        }
    }
    if let Some(title) = b.get("title") {
        match title.as_str().map(str::trim) {
            Some(s) if !s.is_empty() => t.title = s.to_string(),
            _ => return bad("Task title cannot be empty"),
        }
    }
    match opt_string(b, "description") {
        Ok(Some(d)) => t.description = d.filter(|s| !s.is_empty()),
        Ok(None) => {}
        Err(a) => return a,
    }
    match opt_string(b, "assigned_to") {
        Ok(Some(a)) => {
            let a = a.filter(|s| !s.is_empty());
            if a != existing.assigned_to {
                t.previous_assigned_to = existing.assigned_to.clone();
            }
            t.assigned_to = a;
        }
        Ok(None) => {}
        Err(a) => return a,
    }
    if let Some(p) = b.get("priority") {
        match p.as_f64() {
            Some(p) => t.priority = p,
            None => return bad("priority must be a number"),
        }
    }
    if let Some(tags) = b.get("tags") {
        t.tags = match tags {
            Value::Null => None,
            Value::Array(a) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            ),
            _ => return bad("tags must be an array of strings"),
        };
    }
    match opt_string(b, "queue_name") {
        Ok(Some(q)) => t.queue_name = q,
        Ok(None) => {}
        Err(a) => return a,
    }
    if let Some(v) = b.get("blocked_by_task_id") {
        match v {
            Value::Null => t.blocked_by_task_id = None,
            v => match v.as_i64() {
                Some(bid) if bid == id => return bad("A task cannot block itself"),
                Some(bid) if db.tasks.contains_key(&bid) => t.blocked_by_task_id = Some(bid),
                Some(bid) => return not_found(format!("Blocking task not found: {bid}")),
                None => return bad("blocked_by_task_id must be an integer"),
            },
        }
    }
    if t != existing {
        t.updated_at = now();
    }
    db.tasks.insert(id, t);
    ok(db.task_json(&db.tasks[&id], false))
}

fn comment(db: &mut Db, id: i64, b: &Map<String, Value>) -> Answer {
    if !db.tasks.contains_key(&id) {
        return not_found(format!("Task not found: {id}"));
    }
    let content = b
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim();
    if content.is_empty() {
        return bad("Comment content is required");
    }
    let by = b
        .get("created_by")
        .and_then(Value::as_str)
        .map(str::to_string);
    let c = db.add_comment(id, content, by);
    (StatusCode::CREATED, comment_json(&c))
}

fn transfer(db: &mut Db, id: i64, b: &Map<String, Value>) -> Answer {
    let field = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(current), Some(new), Some(text)) =
        (field("current_agent"), field("new_agent"), field("comment"))
    else {
        return bad("current_agent, new_agent and comment are required");
    };
    let Some(t) = db.tasks.get(&id).cloned() else {
        return not_found(format!("Task not found: {id}"));
    };
    if t.assigned_to.as_deref() != Some(current.as_str()) {
        return bad(format!(
            "Task {id} is not assigned to {current} (currently assigned to: {})",
            t.assigned_to.as_deref().unwrap_or("no one")
        ));
    }
    if t.status != "idle" && t.status != "working" {
        return bad(format!(
            "Task {id} with status '{}' cannot be transferred (only 'idle' or 'working' are allowed)",
            t.status
        ));
    }
    {
        let t = db.tasks.get_mut(&id).unwrap();
        t.assigned_to = Some(new);
        t.previous_assigned_to = Some(current.clone());
        t.status = "idle".into();
        t.updated_at = now();
    }
    db.add_comment(id, text.trim(), Some(current));
    ok(db.task_json(&db.tasks[&id], true))
}

fn signup(db: &mut Db, agent: &str) -> Answer {
    let mut idle: Vec<&FakeTask> = db
        .tasks
        .values()
        .filter(|t| t.assigned_to.as_deref() == Some(agent))
        .filter(|t| t.status == "idle" && t.archived_at.is_none())
        .collect();
    idle.sort_by(|a, b| {
        b.priority
            .total_cmp(&a.priority)
            .then_with(|| a.created_at.cmp(&b.created_at))
            .then_with(|| a.id.cmp(&b.id))
    });
    let Some(id) = idle.first().map(|t| t.id) else {
        return not_found("No idle tasks available for signup");
    };
    let t = db.tasks.get_mut(&id).unwrap();
    t.status = "working".into();
    t.updated_at = now();
    ok(db.task_json(&db.tasks[&id], true))
}

fn stats(db: &Db, queue: &str) -> Answer {
    let tasks: Vec<&FakeTask> = db
        .tasks
        .values()
        .filter(|t| t.archived_at.is_none() && t.queue_name.as_deref() == Some(queue))
        .collect();
    let count = |s: &str| tasks.iter().filter(|t| t.status == s).count();
    let assigned = tasks.iter().filter(|t| t.assigned_to.is_some()).count();
    let agents: BTreeSet<&str> = tasks
        .iter()
        .filter_map(|t| t.assigned_to.as_deref())
        .collect();
    ok(json!({
        "queue_name": queue,
        "total_tasks": tasks.len(),
        "by_status": {"idle": count("idle"), "working": count("working"), "complete": count("complete")},
        "assigned": assigned,
        "unassigned": tasks.len() - assigned,
        "agents": agents,
    }))
}

fn comment_json(c: &FakeComment) -> Value {
    json!({
        "id": c.id, "task_id": c.task_id, "content": c.content,
        "created_by": c.created_by, "created_at": c.created_at,
    })
}

/// The query as a map; a repeated key is a 400, as on the real server.
fn parse_query(q: Option<&str>) -> Result<BTreeMap<String, String>, Answer> {
    let mut m = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        if m.insert(k.clone(), percent_decode(v)).is_some() {
            return Err(bad(format!(
                "query parameter {k:?} given more than once; use a comma-separated list"
            )));
        }
    }
    Ok(m)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn number(p: f64) -> Value {
    if p.fract() == 0.0 && p.abs() < 9.0e15 {
        json!(p as i64)
    } else {
        json!(p)
    }
}

fn weak_etag(body: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("W/\"{:x}-{:x}\"", body.len(), h.finish())
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
