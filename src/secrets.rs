//! The one place secrets are compared: in constant time, lengths included.
//!
//! Every secret a client presents (the organizer token, a booking secret, a ticket code's MAC) is
//! checked here, so that how long a comparison takes says nothing about how much of a guess was
//! right — not even how long the real secret is.

/// True if `given` equals `expected`. Runs over the longer of the two whatever they hold, and
/// folds the length difference into the result instead of returning early on it.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let n = given.len().max(expected.len());
    let mut diff = (given.len() ^ expected.len()) as u64;
    for i in 0..n {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= u64::from(a ^ b);
    }
    // Keep the optimizer from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_every_byte_and_the_length_agree() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokeN"));
        assert!(!constant_time_eq(b"secret-token", b"secret-token\0"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
    }
}
