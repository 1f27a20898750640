//! Ticket codes: an HMAC-SHA256 over the booking's facts, keyed by a server secret.
//!
//! A code is `TK-<booking id>-<26 base32 chars>`: the id says which booking to look up, the MAC
//! (the first 128 bits of HMAC-SHA256 over booking id, event id, user id and quantity) proves the
//! server issued it for exactly those facts. Upper-case letters, digits and `-` only, so it fits
//! a QR code's compact alphanumeric mode. The code is a pure function of the booking, so issuing
//! twice (an at-least-once queue redelivering) yields the same code.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept in a code (128 bits: forging one is a 2^-128 guess).
const MAC_BYTES: usize = 16;

/// The facts a ticket code vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketFacts {
    pub booking_id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
}

/// Signs and checks ticket codes with the server key.
#[derive(Clone)]
pub struct TicketSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketSigner { key: <hidden> }")
    }
}

impl TicketSigner {
    pub fn new(key: &[u8]) -> Self {
        TicketSigner { key: key.to_vec() }
    }

    /// A fresh random key, hex encoded, for a database that has none yet.
    pub fn generate_key() -> Result<String, getrandom::Error> {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf)?;
        Ok(data_encoding::HEXLOWER.encode(&buf))
    }

    fn mac(&self, f: &TicketFacts) -> [u8; MAC_BYTES] {
        // KeyInit accepts keys of any length for HMAC.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        };
        mac.update(
            format!(
                "ticketd-v1|{}|{}|{}|{}",
                f.booking_id, f.event_id, f.user_id, f.quantity
            )
            .as_bytes(),
        );
        let full = mac.finalize().into_bytes();
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
        let expected = self.mac(f);
        given.len() == MAC_BYTES
            && given
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
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
