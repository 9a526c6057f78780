//! Helpers shared by the integration tests. Each test binary includes this with `mod support;`.

pub mod tinytask_server;
