//! The synchronisation shim that lets `loom` model-check the real types of this crate.
//!
//! Everything in `src/` that shares memory between threads (the write hand-off, the in-process
//! lease table, the registry's bookkeeping, fast-path flags) imports its primitives from here
//! instead of `std::sync`. A normal build gets `std`; a build with `RUSTFLAGS="--cfg ticketd_loom"`
//! gets `loom::sync`, so `loom-tests/` explores every interleaving of the very code the service
//! runs. The project's own cfg name is used on purpose: `--cfg loom` changes the behaviour of
//! tokio and other dependencies.

#[cfg(not(ticketd_loom))]
pub use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

#[cfg(ticketd_loom)]
pub use loom::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

/// Locks a mutex, recovering the data if a previous holder panicked.
///
/// The state behind our mutexes stays consistent at every await-free step, so a poisoned lock
/// carries no broken invariant; refusing service forever after one panic would be worse.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
