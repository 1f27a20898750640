//! Ticket codes and booking secrets: HMAC-SHA256s over the booking's facts, keyed by a server
//! secret.
//!
//! A code is `TK-<booking id>-<26 base32 chars>`: the id says which booking to look up, the MAC
//! (the first 128 bits of HMAC-SHA256 over booking id, event id, user id and quantity) proves the
//! server issued it for exactly those facts. Upper-case letters, digits and `-` only, so it fits
//! a QR code's compact alphanumeric mode. The code is a pure function of the booking, so issuing
//! twice (an at-least-once queue redelivering) yields the same code.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secrets::constant_time_eq;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in a code (128 bits: forging one is a 2^-128 guess).
const MAC_BYTES: usize = 16;
/// Bytes of a booking secret (192 bits; 32 URL-safe characters).
const SECRET_BYTES: usize = 24;

/// The facts a ticket code vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketFacts {
    pub booking_id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
}

impl From<&crate::domain::Booking> for TicketFacts {
    fn from(b: &crate::domain::Booking) -> Self {
        TicketFacts {
            booking_id: b.id,
            event_id: b.event_id,
            user_id: b.user_id,
            quantity: b.quantity,
        }
    }
}

impl From<&crate::domain::Booked> for TicketFacts {
    fn from(b: &crate::domain::Booked) -> Self {
        TicketFacts {
            booking_id: b.id,
            event_id: b.event_id,
            user_id: b.user_id,
            quantity: b.quantity,
        }
    }
}

/// Signs and checks ticket codes with the server key.
#[derive(Clone)]
pub struct TicketSigner {
    /// HMAC-SHA256 keyed once: its inner and outer pads are hashed here, not for every MAC
    /// (half the SHA-256 blocks of each; every booking takes two, its secret and its code).
    keyed: HmacSha256,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketSigner { key: <hidden> }")
    }
}

impl TicketSigner {
    pub fn new(key: &[u8]) -> Self {
        // KeyInit accepts keys of any length for HMAC.
        let keyed = match HmacSha256::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        TicketSigner { keyed }
    }

    /// A fresh random key, hex encoded, for a database that has none yet.
    pub fn generate_key() -> Result<String, getrandom::Error> {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf)?;
        Ok(data_encoding::HEXLOWER.encode(&buf))
    }

    /// HMAC-SHA256 of the booking's facts under `label` (which keeps the uses apart).
    fn hmac(&self, label: &str, f: &TicketFacts) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(
            format!(
                "{label}|{}|{}|{}|{}",
                f.booking_id, f.event_id, f.user_id, f.quantity
            )
            .as_bytes(),
        );
        mac.finalize().into_bytes().into()
    }

    fn mac(&self, f: &TicketFacts) -> [u8; MAC_BYTES] {
        let full = self.hmac("ticketd-v1", f);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    pub fn sign(&self, f: &TicketFacts) -> String {
        format!(
            "TK-{}-{}",
            f.booking_id,
            data_encoding::BASE32_NOPAD.encode(&self.mac(f))
        )
    }

    /// The booking id a code claims, if it is well formed (not yet checked against the MAC).
    pub fn claimed_booking(code: &str) -> Option<i64> {
        let rest = code.strip_prefix("TK-")?;
        let (id, _) = rest.split_once('-')?;
        if id.starts_with('0') || id.starts_with('+') {
            return None;
        }
        id.parse().ok().filter(|n: &i64| *n >= 1)
    }

    /// True if `code` is exactly the code of these facts (constant-time comparison of the MAC).
    pub fn verify(&self, code: &str, f: &TicketFacts) -> bool {
        let Some(rest) = code.strip_prefix("TK-") else {
            return false;
        };
        let Some((id, mac)) = rest.split_once('-') else {
            return false;
        };
        if id != f.booking_id.to_string() {
            return false;
        }
        let Ok(given) = data_encoding::BASE32_NOPAD.decode(mac.as_bytes()) else {
            return false;
        };
        constant_time_eq(&given, &self.mac(f))
    }

    /// The secret of a booking: what its holder shows to read or cancel it. An HMAC like the
    /// ticket code, under its own label, so neither can be computed from the other; nothing of
    /// it is stored. Whoever holds a copy of the bookings table learns no secret: they would need
    /// the key (`TICKET_KEY`, or the generated one in `ticketd_meta` — set `TICKET_KEY` in the
    /// environment to keep the key out of the database file altogether). Being a function of the
    /// booking, an idempotent replay of `POST /book` returns the same secret.
    pub fn booking_secret(&self, f: &TicketFacts) -> String {
        data_encoding::BASE64URL_NOPAD.encode(&self.hmac("ticketd-secret-v1", f)[..SECRET_BYTES])
    }

    /// True if `given` is the secret of this booking (constant time, lengths included).
    pub fn check_booking_secret(&self, given: &str, f: &TicketFacts) -> bool {
        constant_time_eq(given.as_bytes(), self.booking_secret(f).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: TicketFacts = TicketFacts {
        booking_id: 42,
        event_id: 7,
        user_id: 3,
        quantity: 2,
    };

    /// The codes and secrets already handed out (and imported from SQLite to PostgreSQL) must
    /// verify with every later binary: known answers, computed outside ticketd (Python's hmac).
    #[test]
    fn codes_and_secrets_are_the_hmacs_they_always_were() {
        let s = TicketSigner::new(b"0123456789abcdef");
        assert_eq!(s.sign(&F), "TK-42-CP2SVRM4SNKCBI5F2B27K7QK34");
        assert_eq!(s.booking_secret(&F), "ItHgIeUmMdwKUIZy6SsgqGnmd9uMQFXA");
    }

    #[test]
    fn codes_are_stable_and_bound_to_the_facts() {
        let s = TicketSigner::new(b"0123456789abcdef");
        let code = s.sign(&F);
        assert_eq!(code, s.sign(&F));
        assert!(
            code.starts_with("TK-42-") && code.len() == "TK-42-".len() + 26,
            "{code}"
        );
        assert!(code
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-'));
        assert!(s.verify(&code, &F));
        assert_eq!(TicketSigner::claimed_booking(&code), Some(42));
        assert!(!s.verify(&code, &TicketFacts { quantity: 3, ..F }));
        assert!(!TicketSigner::new(b"another key 12345").verify(&code, &F));
    }

    #[test]
    fn booking_secrets_are_long_url_safe_and_bound_to_the_booking() {
        let s = TicketSigner::new(b"0123456789abcdef");
        let secret = s.booking_secret(&F);
        assert_eq!(
            secret,
            s.booking_secret(&F),
            "a replay gets the same secret"
        );
        assert_eq!(secret.len(), 32);
        assert!(secret
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert!(s.check_booking_secret(&secret, &F));
        assert!(!s.check_booking_secret(&secret[..31], &F));
        assert!(!s.check_booking_secret("", &F));
        assert!(!s.check_booking_secret(
            &secret,
            &TicketFacts {
                booking_id: 43,
                ..F
            }
        ));
        assert!(!TicketSigner::new(b"another key 12345").check_booking_secret(&secret, &F));
        assert!(!s.sign(&F).contains(&secret), "not the ticket code's MAC");
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let s = TicketSigner::new(b"0123456789abcdef");
        let code = s.sign(&F);
        for i in 0..code.len() {
            for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567-0189".chars() {
                let mut altered: Vec<char> = code.chars().collect();
                if altered[i] == c {
                    continue;
                }
                altered[i] = c;
                let altered: String = altered.into_iter().collect();
                assert!(!s.verify(&altered, &F), "{altered} passed");
            }
        }
    }
}
