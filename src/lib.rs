//! ticketd: a ticket booking service for flash sales.
//!
//! ```text
//! client -> actix-web route (api/: parse + validate)
//!   -> Registry (DashMap: event id -> the one EventActor of the event; idle actors passivate)
//!   -> EventActor: queues requests, takes the event's lease (fencing token), allocates a batch
//!      in memory, hands it to the writer, answers after the commit
//!   -> PersistenceActor: the one SQLite writer; group-commits batches of many events in one
//!      transaction; the fenced conditional update refuses any oversell
//!   -> Outbox (in-process or Redis Stream) -> FinalizerPool: signs each ticket, awaits delivery,
//!      marks FINALIZED once, acknowledges; a sweeper re-queues what never arrived
//! Reads (stats, reports, GET /book/{id}) go through a pool of read-only WAL connections.
//! ```
//!
//! The service keeps the HTTP contract of the Python service it replaces; see `../DESIGN.md`
//! (shared) for the promises, in order: never oversell, never lose an acknowledged booking,
//! issue every booking exactly once in effect, stay fast under contention, refuse bad input
//! clearly.

pub mod actors;
pub mod api;
pub mod config;
pub mod coord;
pub mod domain;
pub mod handoff;
pub mod limits;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod slots;
pub mod startup;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod ticket;

pub use config::{Config, Tuning};
pub use startup::Application;
