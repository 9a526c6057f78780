//! Named health checks, reported the way the Kubernetes apiserver reports `/healthz`, `/livez`
//! and `/readyz`.
//!
//! A *liveness* check answers "should this process be restarted?" (it is on `/healthz`, `/livez`
//! and `/readyz`); a *readiness* check answers "is it doing its job yet?" (only on `/readyz`),
//! e.g. `informers-synced`. Both registries start with `ping`, which always passes.
//!
//! ```text
//! $ curl -s localhost:9464/readyz?verbose
//! [+]ping ok
//! [-]informers-synced failed: waiting for the Task cache
//! readyz check failed
//! ```

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

/// A check: `Ok(())` when healthy, `Err(reason)` otherwise. Runs on every request, so keep it
/// cheap (read a flag or a timestamp; do not do I/O).
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Which endpoint a report is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/healthz` (liveness checks).
    Healthz,
    /// `/livez` (the same checks as `/healthz`).
    Livez,
    /// `/readyz` (liveness and readiness checks).
    Readyz,
}

impl Endpoint {
    /// `healthz`, `livez` or `readyz`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Healthz => "healthz",
            Endpoint::Livez => "livez",
            Endpoint::Readyz => "readyz",
        }
    }

    /// The endpoint for a path's first segment.
    pub fn from_name(s: &str) -> Option<Endpoint> {
        match s {
            "healthz" => Some(Endpoint::Healthz),
            "livez" => Some(Endpoint::Livez),
            "readyz" => Some(Endpoint::Readyz),
            _ => None,
        }
    }
}

/// What a health endpoint answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// Every check passed: HTTP 200, else 500.
    pub healthy: bool,
    /// The response body.
    pub body: String,
}

#[derive(Default)]
struct Checks {
    liveness: Vec<(String, Check)>,
    readiness: Vec<(String, Check)>,
}

/// The registry of named checks; cheap to clone, shared with the HTTP server. Adding a check with
/// a name already present replaces it.
#[derive(Clone)]
pub struct HealthRegistry {
    checks: Arc<RwLock<Checks>>,
}

impl Default for HealthRegistry {
    fn default() -> Self {
        HealthRegistry::new()
    }
}

impl std::fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.checks.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("HealthRegistry")
            .field(
                "liveness",
                &c.liveness.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "readiness",
                &c.readiness.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl HealthRegistry {
    /// A registry holding only the `ping` liveness check.
    pub fn new() -> HealthRegistry {
        let r = HealthRegistry {
            checks: Arc::new(RwLock::new(Checks::default())),
        };
        r.add_liveness("ping", || Ok(()));
        r
    }

    /// Adds a liveness check (on `/healthz`, `/livez` and `/readyz`).
    pub fn add_liveness(
        &self,
        name: &str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        let mut c = self.checks.write().unwrap_or_else(|e| e.into_inner());
        upsert(&mut c.liveness, name, Arc::new(check));
    }

    /// Adds a readiness check (on `/readyz` only).
    pub fn add_readiness(
        &self,
        name: &str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        let mut c = self.checks.write().unwrap_or_else(|e| e.into_inner());
        upsert(&mut c.readiness, name, Arc::new(check));
    }

    /// The checks an endpoint runs, in order.
    fn checks_for(&self, endpoint: Endpoint) -> Vec<(String, Check)> {
        let c = self.checks.read().unwrap_or_else(|e| e.into_inner());
        let mut v = c.liveness.clone();
        if endpoint == Endpoint::Readyz {
            v.extend(c.readiness.iter().cloned());
        }
        v
    }

    /// The names of an endpoint's checks, in order.
    pub fn names(&self, endpoint: Endpoint) -> Vec<String> {
        self.checks_for(endpoint)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Runs an endpoint's checks, skipping those named in `exclude`. On success the body is `ok`
    /// unless `verbose`; on failure it always lists every check.
    pub fn report(&self, endpoint: Endpoint, verbose: bool, exclude: &[String]) -> HealthReport {
        let mut lines = String::new();
        let mut healthy = true;
        for (name, check) in self.checks_for(endpoint) {
            if exclude.iter().any(|e| e == &name) {
                lines.push_str(&format!("[+]{name} excluded: ok\n"));
                continue;
            }
            match run_check(&check) {
                Ok(()) => lines.push_str(&format!("[+]{name} ok\n")),
                Err(reason) => {
                    healthy = false;
                    // Debug: a probe every few seconds against a failing check would flood the
                    // journal; the answer itself says why.
                    tracing::debug!(check = %name, endpoint = endpoint.name(), reason = %reason, "health check failed");
                    lines.push_str(&format!("[-]{name} failed: {}\n", one_line(&reason)));
                }
            }
        }
        for e in exclude {
            if !self.names(endpoint).contains(e) {
                lines.push_str(&format!(
                    "warn: some health checks cannot be excluded: no matches for \"{e}\"\n"
                ));
            }
        }
        let verdict = if healthy { "passed" } else { "failed" };
        let body = if healthy && !verbose {
            "ok".to_string()
        } else {
            format!("{lines}{} check {verdict}\n", endpoint.name())
        };
        HealthReport { healthy, body }
    }

    /// Runs one named check, as `/readyz/<name>` does: `ok`, or `internal server error: reason`.
    /// `None` when no such check is on that endpoint.
    pub fn report_one(&self, endpoint: Endpoint, name: &str) -> Option<HealthReport> {
        let (_, check) = self
            .checks_for(endpoint)
            .into_iter()
            .find(|(n, _)| n == name)?;
        Some(match run_check(&check) {
            Ok(()) => HealthReport {
                healthy: true,
                body: "ok".into(),
            },
            Err(reason) => HealthReport {
                healthy: false,
                body: format!("internal server error: {}\n", one_line(&reason)),
            },
        })
    }
}

fn upsert(v: &mut Vec<(String, Check)>, name: &str, check: Check) {
    match v.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = check,
        None => v.push((name.to_string(), check)),
    }
}

fn run_check(check: &Check) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| check())).unwrap_or_else(|_| Err("check panicked".into()))
}

fn one_line(s: &str) -> String {
    s.trim().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_endpoint_says_just_ok_unless_verbose() {
        let r = HealthRegistry::new();
        r.add_liveness("store", || Ok(()));
        let rep = r.report(Endpoint::Healthz, false, &[]);
        assert_eq!(
            rep,
            HealthReport {
                healthy: true,
                body: "ok".into()
            }
        );
        let rep = r.report(Endpoint::Healthz, true, &[]);
        assert_eq!(rep.body, "[+]ping ok\n[+]store ok\nhealthz check passed\n");
    }

    #[test]
    fn a_failing_readiness_check_fails_readyz_but_not_healthz() {
        let r = HealthRegistry::new();
        r.add_readiness("informers-synced", || Err("waiting for Task".into()));
        assert!(r.report(Endpoint::Healthz, false, &[]).healthy);
        let rep = r.report(Endpoint::Readyz, false, &[]);
        assert!(!rep.healthy);
        assert_eq!(
            rep.body,
            "[+]ping ok\n[-]informers-synced failed: waiting for Task\nreadyz check failed\n"
        );
    }

    #[test]
    fn an_excluded_check_does_not_count() {
        let r = HealthRegistry::new();
        r.add_readiness("slow", || Err("no".into()));
        let rep = r.report(Endpoint::Readyz, true, &["slow".into()]);
        assert!(rep.healthy);
        assert!(rep.body.contains("[+]slow excluded: ok\n"), "{}", rep.body);
    }

    #[test]
    fn a_panicking_check_fails_instead_of_killing_the_server() {
        let r = HealthRegistry::new();
        r.add_liveness("boom", || panic!("bad"));
        let rep = r.report(Endpoint::Livez, false, &[]);
        assert!(!rep.healthy);
        assert!(rep.body.contains("[-]boom failed: check panicked"));
    }

    #[test]
    fn re_adding_a_name_replaces_the_check() {
        let r = HealthRegistry::new();
        r.add_readiness("x", || Err("a".into()));
        r.add_readiness("x", || Ok(()));
        assert_eq!(r.names(Endpoint::Readyz), vec!["ping", "x"]);
        assert!(r.report(Endpoint::Readyz, false, &[]).healthy);
    }

    #[test]
    fn one_check_can_be_asked_by_name() {
        let r = HealthRegistry::new();
        r.add_readiness("x", || Err("why".into()));
        assert_eq!(r.report_one(Endpoint::Readyz, "ping").unwrap().body, "ok");
        let x = r.report_one(Endpoint::Readyz, "x").unwrap();
        assert!(!x.healthy);
        assert_eq!(x.body, "internal server error: why\n");
        assert!(r.report_one(Endpoint::Healthz, "x").is_none());
    }
}
