//! The allocation rule, in one place: whether a request gets its seats.
//!
//! The event actor applies it in memory to a whole batch; the writer's fenced transaction then
//! checks the same bounds in the database (capacity in the conditional update, the limit in the
//! conditional upsert of the customer's count), whose word is final whatever the actor believed.

use std::collections::HashMap;

/// The seats of an event as its actor sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub capacity: i64,
    /// Seats held by live bookings, as of the last commit or read.
    pub booked: i64,
    /// Most seats one customer may hold on this event (`None`: no limit).
    pub max_per_user: Option<i64>,
    /// Seats held by the customers this actor has learned of from the store. A customer who is
    /// not here is judged by the store alone.
    pub users: HashMap<i64, i64>,
}

/// What one batch has taken so far, on top of the view.
#[derive(Debug, Default)]
pub struct Taken {
    pub seats: i64,
    users: HashMap<i64, i64>,
}

/// Why the rule refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not enough seats: this many are left.
    SoldOut { remaining: i64 },
    /// The customer would pass the limit: they may still take this many.
    Limit { limit: i64, may_take: i64 },
}

impl View {
    pub fn new(capacity: i64, booked: i64, max_per_user: Option<i64>) -> Self {
        View {
            capacity,
            booked,
            max_per_user,
            users: HashMap::new(),
        }
    }

    /// First come, first served: a request takes its seats if they are all still there after
    /// the ones already taken in this batch, and if its customer stays within the limit;
    /// otherwise it is refused whole (no partial fills) and a later, smaller request may still
    /// fit. Never a zero or negative quantity.
    pub fn allocate(&self, taken: &mut Taken, user_id: i64, quantity: i64) -> Result<(), Refused> {
        if let Some(limit) = self.max_per_user {
            // For a customer it has not learned of, the actor knows only a lower bound (what
            // this batch takes): it refuses what is certainly too much and leaves the rest to
            // the store.
            let held = self.users.get(&user_id).copied().unwrap_or(0)
                + taken.users.get(&user_id).copied().unwrap_or(0);
            if quantity > limit - held {
                return Err(Refused::Limit {
                    limit,
                    may_take: (limit - held).max(0),
                });
            }
        }
        let remaining = self.capacity - self.booked - taken.seats;
        if quantity < 1 || quantity > remaining {
            return Err(Refused::SoldOut {
                remaining: remaining.max(0),
            });
        }
        taken.seats += quantity;
        if self.max_per_user.is_some() {
            *taken.users.entry(user_id).or_default() += quantity;
        }
        Ok(())
    }

    /// Learns a customer's exact count (read by the store).
    pub fn holds(&mut self, user_id: i64, seats: i64) {
        if self.max_per_user.is_some() {
            self.users.insert(user_id, seats);
        }
    }

    /// A customer took `seats` more: known counts follow; unknown ones stay unknown (the actor
    /// knows only what it took, not what they held before).
    pub fn took(&mut self, user_id: i64, seats: i64) {
        if let Some(held) = self.users.get_mut(&user_id) {
            *held += seats;
        }
    }

    pub fn sold_out(&self) -> bool {
        self.booked >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_first_come_first_served_without_partial_fills() {
        let v = View::new(10, 4, None);
        let mut taken = Taken::default();
        assert_eq!(v.allocate(&mut taken, 1, 3), Ok(()));
        assert_eq!(
            v.allocate(&mut taken, 2, 4),
            Err(Refused::SoldOut { remaining: 3 }),
            "only 3 left: refused whole"
        );
        assert_eq!(
            v.allocate(&mut taken, 3, 2),
            Ok(()),
            "a smaller later request still fits"
        );
        assert_eq!(v.allocate(&mut taken, 4, 1), Ok(()));
        assert_eq!(taken.seats, 6);
        assert_eq!(
            v.allocate(&mut taken, 5, 1),
            Err(Refused::SoldOut { remaining: 0 })
        );
        assert_eq!(
            v.allocate(&mut taken, 6, 0),
            Err(Refused::SoldOut { remaining: 0 }),
            "never a zero or negative quantity"
        );
        assert_eq!(
            v.allocate(&mut Taken::default(), 6, -5),
            Err(Refused::SoldOut { remaining: 6 })
        );
    }

    #[test]
    fn sold_out_and_corrupt_views_refuse_everything() {
        assert!(View::new(5, 5, None).sold_out());
        let over = View::new(5, 7, None);
        assert!(over.sold_out());
        assert_eq!(
            over.allocate(&mut Taken::default(), 1, 1),
            Err(Refused::SoldOut { remaining: 0 })
        );
        assert!(!View::new(5, 4, None).sold_out());
    }

    #[test]
    fn the_limit_counts_what_a_known_customer_holds_and_takes_in_the_batch() {
        let mut v = View::new(100, 10, Some(4));
        v.users.insert(7, 3);
        let mut taken = Taken::default();
        assert_eq!(
            v.allocate(&mut taken, 7, 2),
            Err(Refused::Limit {
                limit: 4,
                may_take: 1
            })
        );
        assert_eq!(v.allocate(&mut taken, 7, 1), Ok(()));
        assert_eq!(
            v.allocate(&mut taken, 7, 1),
            Err(Refused::Limit {
                limit: 4,
                may_take: 0
            }),
            "what the batch took counts"
        );
        // A customer the actor has not learned of is left to the store's conditional upsert,
        // unless the request alone, or with the batch, is certainly too much.
        assert_eq!(v.allocate(&mut taken, 8, 4), Ok(()));
        assert_eq!(
            v.allocate(&mut taken, 8, 1),
            Err(Refused::Limit {
                limit: 4,
                may_take: 0
            })
        );
        assert_eq!(
            v.allocate(&mut taken, 9, 5),
            Err(Refused::Limit {
                limit: 4,
                may_take: 4
            })
        );
        assert_eq!(taken.seats, 5);
        // Without a limit nobody is counted.
        let free = View::new(100, 0, None);
        let mut t = Taken::default();
        for _ in 0..10 {
            assert_eq!(free.allocate(&mut t, 1, 5), Ok(()));
        }
        assert!(t.users.is_empty());
    }
}
