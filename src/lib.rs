//! TinyScheduler: a Kubernetes-style control plane for AI coding agents, whose resources live as
//! files on disk.

pub mod agent;
pub mod cli;
pub mod config;
pub mod controllers;
pub mod daemon;
pub mod resources;
pub mod runtime;
pub mod scheduler;
pub mod stdout;
pub mod store;
pub mod tinytask;
