//! The vocabulary of ticketd, shared by the routes, the actors and the store.
//!
//! - `input`: requests parsed and validated at the edge (newtypes, pydantic-style 422 errors);
//! - `booking`: a booking, its status, and the requests and answers that travel between the
//!   routes, the event actors and the writer;
//! - `seats`: the allocation rule — capacity, quantity, per-customer limit — in one place.

pub mod booking;
pub mod input;
pub mod seats;

pub use booking::{
    BookError, Booked, Booking, BookingStatus, CancelRequest, IdempotencyKey, KeyScope, SeatRequest,
};
pub use input::*;
pub use seats::{Refused, Taken, View};
