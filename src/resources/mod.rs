//! API types: metadata, the five kinds, validation and the kind registry.

pub mod agent;
pub mod event;
pub mod lease;
pub mod meta;
pub mod queue;
pub mod registry;
pub mod task;
pub mod validate;

pub use agent::{Agent, AgentSpec, AgentStatus};
pub use event::{Event, EventSpec, EventType, ObjectReference};
pub use lease::{Lease, LeasePhase, LeaseSpec, LeaseStatus};
pub use meta::{Condition, Object, ObjectMeta, Resource, API_VERSION};
pub use queue::{BlockingPolicy, Queue, QueueSource, QueueSpec, QueueStatus};
pub use registry::Kind;
pub use task::{Task, TaskPhase, TaskSpec, TaskStatus};
