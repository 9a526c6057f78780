//! Daemon plumbing: signals, systemd notify and watchdog, HTTP metrics and health endpoints,
//! logging. Each piece stands alone; `run --daemon` wires them together.

pub mod health;
pub mod http;
pub mod lock;
pub mod logging;
pub mod notify;
pub mod signals;
pub mod watchdog;

pub use health::{Endpoint, HealthRegistry, HealthReport};
pub use http::HttpServer;
pub use logging::{init_logging, LogFormat};
pub use notify::Notifier;
pub use signals::{Reloads, Shutdown, Signals};
pub use watchdog::{run_watchdog, Heartbeat, WatchdogConfig};
