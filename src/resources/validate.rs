//! Validation of user-supplied objects: names and per-kind rules, each error with its field path.

use std::fmt;

use super::agent::AgentSpec;
use super::lease::LeaseSpec;
use super::queue::{QueueSource, QueueSpec};
use super::task::TaskSpec;

/// Longest name: a DNS subdomain may have 253 characters, but the store keeps an object in a file
/// named `<name>.json`, and a file name has at most 255 bytes.
pub const MAX_NAME_LEN: usize = 250;

/// One invalid field: its path (`spec.maxConcurrency`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn err(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Checks an RFC 1123 DNS subdomain: at most 250 characters (see [`MAX_NAME_LEN`]) of lower-case alphanumerics, `-` and
/// `.`, each dot-separated label non-empty and starting and ending with an alphanumeric. This is what
/// keeps `/`, `..` and NUL away from the store's paths.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is required".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "must be no more than {MAX_NAME_LEN} characters (got {})",
            name.len()
        ));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    for label in name.split('.') {
        let first = label.chars().next();
        let last = label.chars().last();
        if label.is_empty()
            || !label.chars().all(|c| ok_char(c) || c == '-')
            || !first.is_some_and(ok_char)
            || !last.is_some_and(ok_char)
        {
            return Err(format!(
                "{name:?} is not a valid name: a lowercase RFC 1123 subdomain must consist of lower case \
                 alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ));
        }
    }
    Ok(())
}

/// Checks a label as Kubernetes does, so that every label can be selected with `-l`: the key is
/// an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters; key names and
/// values are alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric. Values
/// may be empty, and as long as an object name (Leases carry their Agent's name as a label).
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    validate_key(key)?;
    if !value.is_empty() && (value.len() > MAX_NAME_LEN || !word(value)) {
        return Err(format!(
            "invalid value {value:?}: at most {MAX_NAME_LEN} characters, alphanumerics, '-', '_' \
             or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// A label's or annotation's key: `[prefix/]name`, as Kubernetes has them.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        validate_name(p).map_err(|e| format!("the key's prefix {p:?}: {e}"))?;
    }
    if name.is_empty() || name.len() > 63 || !word(name) {
        return Err(format!(
            "invalid key {key:?}: a name of at most 63 characters, alphanumerics, '-', '_' or '.', \
             starting and ending with an alphanumeric, after an optional DNS-subdomain prefix and '/'"
        ));
    }
    Ok(())
}

/// A name part of a key, or a label value: alphanumerics, `-`, `_` and `.`, alphanumeric at both
/// ends.
fn word(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn positive(errors: &mut Vec<FieldError>, path: &str, v: i64) {
    if v < 1 {
        errors.push(err(path, format!("must be greater than 0 (got {v})")));
    }
}

/// The most runs one Agent may have at once: each is two processes (shim and agent), so more is a
/// typo, and sums of many agents' limits (a Queue's capacity) must not overflow.
pub const MAX_CONCURRENCY: i64 = 10_000;

/// The longest duration a field may give: ten years. Anything longer means "never" and would
/// overflow the clocks it is added to.
pub const MAX_SECONDS: i64 = 10 * 365 * 24 * 3600;

/// A duration field: at least `min` seconds and at most [`MAX_SECONDS`].
fn seconds(errors: &mut Vec<FieldError>, path: &str, v: i64, min: i64) {
    if v < min {
        let what = if min == 0 {
            "0 or greater"
        } else {
            "greater than 0"
        };
        errors.push(err(path, format!("must be {what} (got {v})")));
    } else if v > MAX_SECONDS {
        errors.push(err(
            path,
            format!("must be at most {MAX_SECONDS} (ten years; got {v})"),
        ));
    }
}

fn optional_name(errors: &mut Vec<FieldError>, path: &str, v: &Option<String>) {
    if let Some(n) = v {
        if let Err(e) = validate_name(n) {
            errors.push(err(path, e));
        }
    }
}

/// Rules for an Agent's spec.
pub fn validate_agent(spec: &AgentSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    optional_name(&mut e, "spec.queue", &spec.queue);
    positive(&mut e, "spec.maxConcurrency", spec.max_concurrency);
    if spec.max_concurrency > MAX_CONCURRENCY {
        e.push(err(
            "spec.maxConcurrency",
            format!(
                "must be at most {MAX_CONCURRENCY} (got {})",
                spec.max_concurrency
            ),
        ));
    }
    seconds(&mut e, "spec.heartbeatSeconds", spec.heartbeat_seconds, 1);
    seconds(
        &mut e,
        "spec.maxRuntimeSeconds",
        spec.max_runtime_seconds,
        1,
    );
    if spec.command.first().is_some_and(|c| c.is_empty()) {
        e.push(err("spec.command[0]", "the program must not be empty"));
    }
    for (i, a) in spec.command.iter().enumerate() {
        if a.contains('\0') {
            e.push(err(&format!("spec.command[{i}]"), "must not contain NUL"));
        }
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            e.push(err(
                &format!("spec.env.{k}"),
                "names must be non-empty without '=' or NUL",
            ));
        }
    }
    e
}

/// Rules for a Queue's spec.
pub fn validate_queue(spec: &QueueSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    if let Some(p) = spec.poll_interval_seconds {
        seconds(&mut e, "spec.pollIntervalSeconds", p, 1);
    }
    if spec.source == QueueSource::Local {
        if spec.endpoint.is_some() {
            e.push(err("spec.endpoint", "only allowed with source: tinytask"));
        }
        if spec.remote_queue.is_some() {
            e.push(err(
                "spec.remoteQueue",
                "only allowed with source: tinytask",
            ));
        }
    }
    if let Some(ep) = &spec.endpoint {
        if !(ep.starts_with("http://") || ep.starts_with("https://")) {
            e.push(err("spec.endpoint", "must be an http:// or https:// URL"));
        } else if has_credentials(ep) {
            e.push(err("spec.endpoint", CREDENTIALS));
        }
    }
    e
}

/// Why a tinytask URL may not carry a user name or password.
pub const CREDENTIALS: &str = "must not contain a user name or password: tinytask has no \
     authentication, and the URL is shown in logs, Events and status";

/// Whether the authority of `url` (`scheme://user:pass@host/…`) names a user.
pub fn has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}

/// Rules for a Task's spec.
pub fn validate_task(name: &str, spec: &TaskSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    if spec.queue.is_none() && spec.assigned_to.is_none() {
        e.push(err(
            "spec.queue",
            "required: set spec.queue or spec.assignedTo",
        ));
    }
    optional_name(&mut e, "spec.queue", &spec.queue);
    optional_name(&mut e, "spec.assignedTo", &spec.assigned_to);
    for (i, b) in spec.blocked_by.iter().enumerate() {
        let path = format!("spec.blockedBy[{i}]");
        if let Err(m) = validate_name(b) {
            e.push(err(&path, m));
        } else if b == name {
            e.push(err(&path, "a task cannot block itself"));
        }
    }
    // Two keys that name one variable (`pr-url`, `pr_url`): the agent would get only one.
    let mut by_variable: std::collections::BTreeMap<String, &String> = Default::default();
    for (k, v) in &spec.params {
        let path = format!("spec.params.{k}");
        let variable = crate::resources::task::param_env_name(k);
        if let Some(first) = by_variable.insert(variable.clone(), k) {
            e.push(err(
                &path,
                format!("is passed to the agent as {variable}, as is spec.params.{first}"),
            ));
        }
        if k.is_empty() || k.contains('\0') || k.contains('=') {
            e.push(err(&path, "keys must be non-empty without '=' or NUL"));
        }
        if v.is_object() || v.is_array() {
            e.push(err(&path, "must be a string, number or boolean"));
        }
        if let Some(text) = v.as_str() {
            // The agent gets it as TINYSCHEDULER_PARAM_<KEY>=<value>: no NUL, and within what
            // the kernel takes for one variable, else the agent could never be started.
            let env_len = variable.len() + 1 + text.len();
            if text.contains('\0') {
                e.push(err(&path, "must not contain NUL"));
            } else if env_len > MAX_ENV_STRING {
                e.push(err(
                    &path,
                    format!(
                        "{} bytes is too long: the agent gets each param as an environment \
                         variable, TINYSCHEDULER_PARAM_<KEY>=<value>, at most {MAX_ENV_STRING} \
                         bytes in all",
                        text.len()
                    ),
                ));
            }
        }
    }
    if spec.max_retries < 0 {
        e.push(err(
            "spec.maxRetries",
            format!("must be 0 or greater (got {})", spec.max_retries),
        ));
    }
    if let Some(t) = spec.timeout_seconds {
        seconds(&mut e, "spec.timeoutSeconds", t, 1);
    }
    if let Some(t) = spec.ttl_seconds_after_finished {
        seconds(&mut e, "spec.ttlSecondsAfterFinished", t, 0);
    }
    e
}

/// The longest `NAME=value` string the kernel passes to a new program (`MAX_ARG_STRLEN`, 32
/// pages, less the closing NUL).
pub const MAX_ENV_STRING: usize = 32 * 4096 - 1;

/// Rules for a Lease's spec.
pub fn validate_lease(spec: &LeaseSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    if let Err(m) = validate_name(&spec.task) {
        e.push(err("spec.task", m));
    }
    if let Err(m) = validate_name(&spec.agent) {
        e.push(err("spec.agent", m));
    }
    positive(
        &mut e,
        "spec.leaseDurationSeconds",
        spec.lease_duration_seconds,
    );
    seconds(
        &mut e,
        "spec.maxRuntimeSeconds",
        spec.max_runtime_seconds,
        1,
    );
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_url_whose_authority_names_a_user_has_credentials() {
        assert!(has_credentials("http://u:p@h:1"));
        assert!(has_credentials("https://u@h/x"));
        assert!(!has_credentials("http://h:1/a@b"));
        assert!(!has_credentials("http://h:1?x=a@b"));
        assert!(!has_credentials("http://h:1"));
    }

    #[test]
    fn names_follow_rfc1123_subdomains() {
        for ok in ["a", "vaela", "task-1", "tt-42", "a.b-c.d", &"a".repeat(250)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a/b",
            "..",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a_b",
            "a\0b",
            "ü",
            &"a".repeat(251),
            &"a".repeat(254),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn zero_and_negative_limits_name_their_field() {
        let spec = AgentSpec {
            max_concurrency: 0,
            heartbeat_seconds: -5,
            ..Default::default()
        };
        let errs = validate_agent(&spec);
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.maxConcurrency", "spec.heartbeatSeconds"]);
        assert!(errs[1].message.contains("-5"));
    }

    #[test]
    fn an_agents_limit_is_at_most_ten_thousand() {
        let agent = |n| AgentSpec {
            max_concurrency: n,
            ..Default::default()
        };
        assert!(validate_agent(&agent(MAX_CONCURRENCY)).is_empty());
        let errs = validate_agent(&agent(i64::MAX));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "spec.maxConcurrency");
        assert_eq!(
            errs[0].message,
            "must be at most 10000 (got 9223372036854775807)"
        );
    }

    #[test]
    fn two_params_that_would_be_one_variable_are_refused() {
        let spec = TaskSpec {
            queue: Some("q".into()),
            params: [
                ("pr-url".to_string(), serde_json::Value::from("a")),
                ("pr_url".to_string(), serde_json::Value::from("b")),
            ]
            .into(),
            ..Default::default()
        };
        let errs = validate_task("t", &spec);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "spec.params.pr_url");
        assert_eq!(
            errs[0].message,
            "is passed to the agent as TINYSCHEDULER_PARAM_PR_URL, as is spec.params.pr-url"
        );
    }

    #[test]
    fn a_task_needs_a_queue_or_an_agent() {
        let errs = validate_task("t", &TaskSpec::default());
        assert_eq!(errs[0].path, "spec.queue");
    }

    #[test]
    fn a_param_the_agents_environment_cannot_carry_is_refused() {
        let task = |k: &str, v: &str| TaskSpec {
            queue: Some("q".into()),
            params: [(k.to_string(), serde_json::Value::from(v))].into(),
            ..Default::default()
        };
        // TINYSCHEDULER_PARAM_K=<value>: 22 bytes besides the value.
        let fits = "x".repeat(MAX_ENV_STRING - 22);
        assert!(validate_task("t", &task("k", &fits)).is_empty());
        let errs = validate_task("t", &task("k", &format!("{fits}x")));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "spec.params.k");
        assert!(errs[0].message.contains("environment variable"), "{errs:?}");
        let errs = validate_task("t", &task("k", "a\0b"));
        assert_eq!(errs[0].message, "must not contain NUL");
    }
}
