//! The controller framework: informers, work queue, backoff, controller loop, metrics, events.
//! Knows nothing about agents or tasks.

pub mod backoff;
pub mod controller;
pub mod events;
pub mod informer;
pub mod metrics;
pub mod workqueue;

pub use backoff::Backoff;
pub use controller::{Action, Controller};
pub use events::Recorder;
pub use informer::{Informer, InformerEvent, InformerOptions};
pub use metrics::{Counter, Gauge, Histogram, Metrics};
pub use workqueue::WorkQueue;
