//! TinyScheduler: a Kubernetes-style control plane for AI coding agents, whose resources live as
//! files on disk.

pub mod resources;
pub mod store;
