//! The actors: per-event allocation, the registry that finds them, the one SQLite writer, and
//! the finalizer pool.

pub mod event;
pub mod finalizer;
pub mod persistence;
pub mod registry;

pub use persistence::{PersistenceActor, Writer};
pub use registry::Registry;
