pub use ticketd;
