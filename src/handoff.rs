//! The hand-off between the many producers of writes (event actors, finalizers, routes) and the
//! one SQLite writer thread: a bounded queue drained a whole group at a time.
//!
//! Group commit lives here: while the writer is busy committing one transaction, new work piles
//! up, and `next_group` hands all of it (up to a bound) to the next transaction, so one fsync
//! pays for many batches from many events. Every item submitted is handed out exactly once,
//! also after `close` (the writer drains what was accepted before it stops); an item that is
//! refused is given back to its producer, which answers its clients itself. That is what makes
//! "every accepted request is answered or committed" hold through shutdown; `loom-tests` checks it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sync::{lock, Condvar, Mutex};

/// Why an item was not accepted; the item comes back so its producer can answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// More than the bound is waiting: the writer is behind; answer 503 rather than queue.
    Full(T),
    /// The writer is shutting down.
    Closed(T),
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The consumer is (about to be) asleep on `ready`. Producers wake it only then: a
    /// notification is a system call, and a busy writer (the flash-sale case) needs none.
    waiting: bool,
}

/// A bounded multi-producer, single-consumer queue handing out groups.
pub struct WriteQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    limit: usize,
}

impl<T> WriteQueue<T> {
    pub fn new(limit: usize) -> Self {
        WriteQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                waiting: false,
            }),
            ready: Condvar::new(),
            limit: limit.max(1),
        }
    }

    /// Queues an item for the writer, or gives it back.
    pub fn submit(&self, item: T) -> Result<(), Refused<T>> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(Refused::Closed(item));
        }
        if st.items.len() >= self.limit {
            return Err(Refused::Full(item));
        }
        st.items.push_back(item);
        let wake = st.waiting;
        drop(st);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Blocks until there is work, then takes up to `max` items. Returns `None` only once the
    /// queue is closed and empty: nothing accepted is ever left behind.
    pub fn next_group(&self, max: usize) -> Option<Vec<T>> {
        self.next_group_lingering(max, Duration::ZERO, |_| true)
    }

    /// `next_group`, except that work which can wait (`can_wait` says of every item waiting)
    /// first lingers up to `linger` for company: an item that cannot wait, or `max` items. The
    /// writer uses it so that a group of ticket issuances rides with the next batch of bookings
    /// instead of paying a commit and an fsync of its own. Everything is handed out all the same.
    pub fn next_group_lingering(
        &self,
        max: usize,
        linger: Duration,
        can_wait: impl Fn(&T) -> bool,
    ) -> Option<Vec<T>> {
        let max = max.max(1);
        let mut st = lock(&self.state);
        loop {
            if !st.items.is_empty() {
                break;
            }
            if st.closed {
                return None;
            }
            // Set under the lock that `wait` releases atomically: a producer either pushed
            // before (seen above) or sees the flag and notifies.
            st.waiting = true;
            st = match self.ready.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            st.waiting = false;
        }
        if !linger.is_zero() {
            let until = Instant::now() + linger;
            while !st.closed && st.items.len() < max && st.items.iter().all(&can_wait) {
                let Some(left) = until.checked_duration_since(Instant::now()) else {
                    break;
                };
                st.waiting = true;
                st = match self.ready.wait_timeout(st, left) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
                st.waiting = false;
            }
        }
        let n = st.items.len().min(max);
        Some(st.items.drain(..n).collect())
    }

    /// Refuses new items from now on; the consumer still gets everything already accepted.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    pub fn len(&self) -> usize {
        lock(&self.state).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(ticketd_loom)))]
mod tests {
    use super::*;

    #[test]
    fn groups_bounds_and_close() {
        let q = WriteQueue::new(3);
        for i in 0..3 {
            q.submit(i).unwrap();
        }
        assert_eq!(q.submit(9), Err(Refused::Full(9)));
        assert_eq!(q.next_group(2), Some(vec![0, 1]));
        q.close();
        assert_eq!(q.submit(7), Err(Refused::Closed(7)));
        assert_eq!(
            q.next_group(10),
            Some(vec![2]),
            "accepted items survive close"
        );
        assert_eq!(q.next_group(10), None);
    }

    #[test]
    fn work_that_can_wait_lingers_for_company_but_not_past_its_bound() {
        let q = std::sync::Arc::new(WriteQueue::new(10));
        let linger = std::time::Duration::from_millis(200);
        // Odd items can wait, even ones cannot.
        let can_wait = |i: &i32| i % 2 == 1;
        q.submit(1).unwrap();
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.next_group_lingering(10, linger, can_wait));
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.submit(3).unwrap();
        q.submit(2).unwrap();
        assert_eq!(
            t.join().unwrap(),
            Some(vec![1, 3, 2]),
            "joined by what came"
        );

        // Nothing comes: the waiting work goes alone once its linger is over.
        q.submit(5).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(q.next_group_lingering(10, linger, can_wait), Some(vec![5]));
        let waited = started.elapsed();
        assert!(
            waited >= linger && waited < linger * 5,
            "it lingered, {waited:?}"
        );

        // Work that cannot wait does not; nor a full group; nor anything once the queue closes.
        q.submit(4).unwrap();
        q.submit(7).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            q.next_group_lingering(10, linger, can_wait),
            Some(vec![4, 7])
        );
        assert_eq!(q.submit(9).and(q.submit(11)), Ok(()));
        assert_eq!(
            q.next_group_lingering(2, linger, can_wait),
            Some(vec![9, 11])
        );
        q.submit(13).unwrap();
        q.close();
        assert_eq!(q.next_group_lingering(10, linger, can_wait), Some(vec![13]));
        assert!(started.elapsed() < linger, "none of these waited");
        assert_eq!(q.next_group_lingering(10, linger, can_wait), None);
    }

    #[test]
    fn consumer_wakes_for_a_producer() {
        let q = std::sync::Arc::new(WriteQueue::new(10));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.next_group(10));
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.submit(1).unwrap();
        assert_eq!(t.join().unwrap(), Some(vec![1]));
    }
}
