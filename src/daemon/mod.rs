//! Daemon plumbing: signals, systemd notify and watchdog, HTTP metrics and health endpoints.
