//! Coordination: who may allocate seats of an event (the lease, with fencing tokens) and how
//! committed bookings reach the finalizers (the queue). Embedded mode uses the in-process
//! versions here; cluster mode puts the same contracts on Redis.

pub mod lease;
pub mod queue;
pub mod redis;
pub mod stream;

pub use lease::{Lease, LeaseError, LeaseTable};
pub use queue::{LocalQueue, Outbox, Owed};
pub use redis::{RedisLease, RedisLink};
