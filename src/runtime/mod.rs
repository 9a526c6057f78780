//! The controller framework: informers, work queue, backoff, controller loop, metrics, events.
//! Knows nothing about agents or tasks.
