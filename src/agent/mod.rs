//! Process supervision: the per-run shim, spawning, liveness (pid + start time) and killing.

pub mod shim;
