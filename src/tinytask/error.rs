//! The one error type of the tinytask client: says what failed, on which call.

use std::time::Duration;

/// What went wrong talking to tinytask. Every variant names the request (`GET http://…`).
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The endpoint setting is not a usable `http(s)://host[:port]` URL.
    InvalidEndpoint { endpoint: String, message: String },
    /// No connection could be made (refused, unreachable, DNS).
    Connect { request: String, message: String },
    /// No (complete) answer within the request timeout.
    Timeout { request: String, after: Duration },
    /// The server answered with an error status; `message` is its `{"error"}` text (or the body).
    Status {
        request: String,
        status: u16,
        message: String,
    },
    /// The server answered 2xx with a body that is not the JSON this endpoint returns.
    Decode { request: String, message: String },
    /// Any other transport failure (connection reset mid-answer, …).
    Transport { request: String, message: String },
}

impl Error {
    /// The HTTP status, for [`Error::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 404 for a task: the server's message says a task is not found (`Task 7 not found`). A 404
    /// for an unknown path (a wrong endpoint, a proxy, an older server) says nothing about the
    /// task, so it is not taken for a deleted task: results are kept and retried, not dropped.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Status {
                status: 404,
                message,
                ..
            } => {
                // `Task 7 not found`, `Task not found: 7`; not a route's 404 that quotes the
                // path (`Route PATCH /api/v1/tasks/7 not found`).
                let m = message.trim().to_ascii_lowercase();
                m.starts_with("task ") && m.contains("not found")
            }
            _ => false,
        }
    }

    /// The server could not be reached at all (connect failure or timeout): an outage rather
    /// than a refusal.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::Timeout { .. })
    }

    /// The request that failed, as `METHOD URL`.
    pub fn request(&self) -> &str {
        match self {
            Error::InvalidEndpoint { endpoint, .. } => endpoint,
            Error::Connect { request, .. }
            | Error::Timeout { request, .. }
            | Error::Status { request, .. }
            | Error::Decode { request, .. }
            | Error::Transport { request, .. } => request,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidEndpoint { endpoint, message } => {
                write!(f, "invalid tinytask endpoint {endpoint:?}: {message}")
            }
            Error::Connect { request, message } => {
                write!(f, "tinytask {request}: cannot connect: {message}")
            }
            Error::Timeout { request, after } => {
                write!(f, "tinytask {request}: no answer within {after:?}")
            }
            Error::Status {
                request,
                status,
                message,
            } => write!(f, "tinytask {request}: HTTP {status}: {message}"),
            Error::Decode { request, message } => {
                write!(
                    f,
                    "tinytask {request}: malformed JSON in the answer: {message}"
                )
            }
            Error::Transport { request, message } => write!(f, "tinytask {request}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// What the client's calls return.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, message: &str) -> Error {
        Error::Status {
            request: "PATCH http://h/api/v1/tasks/7".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn only_a_404_that_says_the_task_is_not_found_means_the_task_is_gone() {
        assert!(status(404, "Task 7 not found").is_not_found());
        assert!(status(404, "Task not found: 7").is_not_found());
        assert!(!status(404, "Cannot PATCH /tinytask/api/v1/tasks/7").is_not_found());
        assert!(!status(404, "Not Found").is_not_found());
        assert!(!status(404, "Route PATCH /api/v1/tasks/7 not found").is_not_found());
        assert!(!status(400, "Task 7 not found").is_not_found());
    }
}
