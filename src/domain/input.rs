//! Validated domain values and the rules that parse them out of untrusted JSON.
//!
//! Requests are parsed into these newtypes at the edge (the routes) so that nothing past the
//! routes ever sees an id of zero, a negative quantity or a 10 MB title. The error list mimics
//! the old service's FastAPI/pydantic 422 body (`detail: [{type, loc, msg}]`) so its clients keep
//! working, but the rules are strict where pydantic was lax: `"5"` and `true` are not ints (an
//! integral number such as `5.0` or `1e3` is, as JSON Schema says).

use serde::Serialize;
use serde_json::{Map, Value};

/// Largest capacity an event may have; keeps every sum of counters far from i64 overflow.
pub const MAX_CAPACITY: i64 = 1_000_000_000_000;
/// Largest quantity of one booking: a flash sale sells seats, not stadiums, per request.
pub const MAX_QUANTITY: i64 = 10_000;
/// Longest event title, in characters (the old service's `constr(max_length=200)`).
pub const MAX_TITLE_CHARS: usize = 200;

/// One reason a request was refused with 422: where (`loc`) and why (`msg`), pydantic style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The kind of mistake, for programs (`missing`, `int_type`, `greater_than_equal`, …).
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "greater_than_equal")]
    pub kind: &'static str,
    /// Where: `["body", "<field>"]`, `["path", "id"]`, `["query", "limit"]` or `["header", …]`.
    #[schema(example = json!(["body", "capacity"]))]
    pub loc: Vec<String>,
    /// Why, for a person.
    #[schema(example = "Input should be greater than or equal to 1")]
    pub msg: String,
}

impl FieldError {
    pub fn new(kind: &'static str, loc: &[&str], msg: impl Into<String>) -> Self {
        FieldError {
            kind,
            loc: loc.iter().map(|s| s.to_string()).collect(),
            msg: msg.into(),
        }
    }
}

/// An id of an event, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EventId(pub i64);
/// An id of a booking, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BookingId(pub i64);

/// A validated `POST /event` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub title: String,
    pub capacity: i64,
    /// Most seats one customer may hold (1..=capacity), if limited.
    pub max_per_user: Option<i64>,
}

/// A validated `POST /book` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBooking {
    pub user_id: i64,
    pub event_id: EventId,
    pub quantity: i64,
}

/// 2^63: the first float past `i64::MAX` (every integral float below it converts exactly).
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// Collects the errors of one JSON object's fields, so a client learns of all of them at once.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    fn int(&mut self, name: &str, default: Option<i64>, min: i64, max: i64) -> Option<i64> {
        let loc = ["body", name];
        let v = match self.obj.get(name) {
            None if default.is_some() => return default,
            None => {
                self.errors
                    .push(FieldError::new("missing", &loc, "Field required"));
                return None;
            }
            Some(v) => v,
        };
        let n = match v {
            Value::Number(n) if n.is_i64() => n.as_i64(),
            // Past i64: beyond every bound of ours. (`u64::MAX`, `1e30`.)
            Value::Number(n) if n.is_u64() || n.as_f64().is_some_and(|f| f >= TWO_POW_63) => {
                self.errors.push(FieldError::new(
                    "less_than_equal",
                    &loc,
                    format!("Input should be less than or equal to {max}"),
                ));
                return None;
            }
            Value::Number(n) if n.as_f64().is_some_and(|f| f < -TWO_POW_63) => {
                self.errors.push(FieldError::new(
                    "greater_than_equal",
                    &loc,
                    format!("Input should be greater than or equal to {min}"),
                ));
                return None;
            }
            // An integral number written with a fraction or an exponent (`5.0`, `1e3`) is an
            // integer, as JSON Schema and pydantic say; `5.5` is not.
            Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                n.as_f64().map(|f| f as i64)
            }
            Value::Number(_) => {
                self.errors.push(FieldError::new(
                    "int_type",
                    &loc,
                    "Input should be a valid integer, got a number with a fractional part",
                ));
                return None;
            }
            _ => {
                self.errors.push(FieldError::new(
                    "int_type",
                    &loc,
                    "Input should be a valid integer",
                ));
                return None;
            }
        }?;
        if n < min {
            self.errors.push(FieldError::new(
                "greater_than_equal",
                &loc,
                format!("Input should be greater than or equal to {min}"),
            ));
            None
        } else if n > max {
            self.errors.push(FieldError::new(
                "less_than_equal",
                &loc,
                format!("Input should be less than or equal to {max}"),
            ));
            None
        } else {
            Some(n)
        }
    }

    fn title(&mut self, name: &str) -> Option<String> {
        let loc = ["body", name];
        match self.obj.get(name) {
            None => {
                self.errors
                    .push(FieldError::new("missing", &loc, "Field required"));
                None
            }
            Some(Value::String(s)) => {
                let chars = s.chars().count();
                if chars == 0 {
                    self.errors.push(FieldError::new(
                        "string_too_short",
                        &loc,
                        "String should have at least 1 character",
                    ));
                    None
                } else if chars > MAX_TITLE_CHARS {
                    self.errors.push(FieldError::new(
                        "string_too_long",
                        &loc,
                        format!("String should have at most {MAX_TITLE_CHARS} characters"),
                    ));
                    None
                } else if s.trim().is_empty() {
                    self.errors.push(FieldError::new(
                        "string_blank",
                        &loc,
                        "String should not be blank",
                    ));
                    None
                } else if s.chars().any(|c| c.is_control()) {
                    self.errors.push(FieldError::new(
                        "string_control_chars",
                        &loc,
                        "String should not contain control characters",
                    ));
                    None
                } else if s.chars().any(invisible) {
                    self.errors.push(FieldError::new(
                        "string_invisible_chars",
                        &loc,
                        "String should not contain bidirectional-control or zero-width characters",
                    ));
                    None
                } else {
                    Some(s.clone())
                }
            }
            Some(_) => {
                self.errors.push(FieldError::new(
                    "string_type",
                    &loc,
                    "Input should be a valid string",
                ));
                None
            }
        }
    }
}

/// Characters that change how a title *looks* without being seen: bidirectional controls
/// (`"\u{202e}txt.exe"` shows as `exe.txt`) and zero-width ones (two titles that look the same).
/// Refused rather than stored escaped: titles are shown on tickets and reports by clients we do
/// not control, which would render either the trick or the escape. (A joiner inside an emoji
/// sequence is refused too: titles are plain text.)
fn invisible(c: char) -> bool {
    INVISIBLE
        .iter()
        .any(|&(low, high)| (low..=high).contains(&c))
}

/// The invisible characters, as ranges (`title_pattern` writes them into the API description).
const INVISIBLE: [(char, char); 6] = [
    ('\u{061C}', '\u{061C}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{2069}'),
    ('\u{FEFF}', '\u{FEFF}'),
];

/// The title rules as a regular expression (ECMA 262 and Python alike), for the API
/// description: no control character (`char::is_control`: C0, DEL, C1), none of `INVISIBLE`, and
/// something that is not white space (`[\s\S]`, not `.`: ECMA's dot stops at U+2028).
pub fn title_pattern() -> String {
    let mut refused = String::from("\\x00-\\x1f\\x7f-\\x9f");
    for (low, high) in INVISIBLE {
        refused.push_str(&format!("\\u{:04x}", low as u32));
        if high != low {
            refused.push_str(&format!("-\\u{:04x}", high as u32));
        }
    }
    format!("^(?=[\\s\\S]*\\S)[^{refused}]*$")
}

fn object(body: &Value) -> Result<&Map<String, Value>, Vec<FieldError>> {
    body.as_object().ok_or_else(|| {
        vec![FieldError::new(
            "model_attributes_type",
            &["body"],
            "Input should be a valid dictionary or object",
        )]
    })
}

impl NewEvent {
    /// Parses `{title: 1..200 chars, capacity: >= 1, max_per_user?: 1..=capacity}`; unknown
    /// fields are ignored, as before.
    pub fn parse(body: &Value) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields {
            obj: object(body)?,
            errors: Vec::new(),
        };
        let title = f.title("title");
        let capacity = f.int("capacity", None, 1, MAX_CAPACITY);
        // Optional (null is absent, as pydantic's Optional); at most the capacity.
        let max_per_user = match f.obj.get("max_per_user") {
            None | Some(Value::Null) => Some(None),
            Some(_) => f
                .int("max_per_user", None, 1, capacity.unwrap_or(MAX_CAPACITY))
                .map(Some),
        };
        match (title, capacity, max_per_user) {
            (Some(title), Some(capacity), Some(max_per_user)) if f.errors.is_empty() => {
                Ok(NewEvent {
                    title,
                    capacity,
                    max_per_user,
                })
            }
            _ => Err(f.errors),
        }
    }
}

impl NewBooking {
    /// Parses `{user_id: >= 1, event_id: >= 1, quantity?: >= 1}` (quantity defaults to 1).
    pub fn parse(body: &Value) -> Result<Self, Vec<FieldError>> {
        Self::parse_for(body, None)
    }

    /// As `parse`, for a customer proven by a token: `user_id` may be left out and defaults to
    /// theirs (the route refuses a different one with 403).
    pub fn parse_for(body: &Value, customer: Option<i64>) -> Result<Self, Vec<FieldError>> {
        let mut f = Fields {
            obj: object(body)?,
            errors: Vec::new(),
        };
        let user_id = f.int("user_id", customer, 1, i64::MAX);
        let event_id = f.int("event_id", None, 1, i64::MAX);
        let quantity = f.int("quantity", Some(1), 1, MAX_QUANTITY);
        match (user_id, event_id, quantity) {
            (Some(user_id), Some(event_id), Some(quantity)) if f.errors.is_empty() => {
                Ok(NewBooking {
                    user_id,
                    event_id: EventId(event_id),
                    quantity,
                })
            }
            _ => Err(f.errors),
        }
    }
}

/// Longest ticket code `POST /ticket/verify` reads, in characters (a genuine one is far shorter).
pub const MAX_TICKET_CODE: usize = 128;

/// Parses `POST /ticket/verify {code}`: the code as scanned, 1 to `MAX_TICKET_CODE` characters.
pub fn parse_ticket_code(body: &Value) -> Result<String, Vec<FieldError>> {
    let obj = object(body)?;
    let loc = ["body", "code"];
    match obj.get("code") {
        None => Err(vec![FieldError::new("missing", &loc, "Field required")]),
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_TICKET_CODE => {
            Ok(s.trim().to_string())
        }
        Some(Value::String(_)) => Err(vec![FieldError::new(
            "string_length",
            &loc,
            format!("String should have 1 to {MAX_TICKET_CODE} characters"),
        )]),
        Some(_) => Err(vec![FieldError::new(
            "string_type",
            &loc,
            "Input should be a valid string",
        )]),
    }
}

/// Longest `Idempotency-Key`, in characters (Stripe's and the IETF draft's usual bound).
pub const MAX_KEY_CHARS: usize = 255;

/// Parses an `Idempotency-Key` header value: 1 to 255 printable ASCII characters.
pub fn parse_idempotency_key(raw: &[u8]) -> Result<String, FieldError> {
    let loc = ["header", "idempotency-key"];
    if raw.is_empty() || raw.len() > MAX_KEY_CHARS {
        return Err(FieldError::new(
            "string_length",
            &loc,
            format!("Idempotency-Key should have 1 to {MAX_KEY_CHARS} characters"),
        ));
    }
    if !raw.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(FieldError::new(
            "string_pattern_mismatch",
            &loc,
            "Idempotency-Key should contain printable ASCII characters only",
        ));
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// Parses an id taken from the path (`/event/{id}`): a decimal integer from 1 to i64::MAX.
/// Numbers in paths and queries are plain decimal digits: Rust's parser also takes `+1` (and
/// `-0`), which would give one booking several URLs and a misleading "must be at least 1" for a
/// sign.
fn plain_digits(raw: &str) -> bool {
    !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit())
}

pub fn parse_path_id(raw: &str, name: &str) -> Result<i64, FieldError> {
    let loc = ["path", name];
    if !plain_digits(raw) {
        return Err(FieldError::new(
            "int_parsing",
            &loc,
            "Input should be a positive integer written in decimal digits",
        ));
    }
    match raw.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err(FieldError::new(
            "greater_than_equal",
            &loc,
            "Input should be greater than or equal to 1",
        )),
        Err(_) => Err(FieldError::new(
            "int_parsing",
            &loc,
            "Input should be a valid integer, unable to parse string as an integer",
        )),
    }
}

/// Most events one page of `GET /event` lists, and how many when the client does not say.
pub const MAX_PAGE: i64 = 200;
pub const DEFAULT_PAGE: i64 = 50;

/// A page of a listing by id (keyset pagination): the ids after `after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub after: i64,
    pub limit: i64,
}

impl Page {
    /// From the query's `limit` (1..=`MAX_PAGE`) and `after` (an id, or 0: from the start);
    /// other parameters are ignored, as FastAPI did. Plain decimal digits only.
    pub fn parse(query: &[(String, String)]) -> Result<Page, Vec<FieldError>> {
        let value = |name: &str| query.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
        let mut errors = Vec::new();
        let mut number = |name: &str, min: i64, max: i64, default: i64| -> i64 {
            let Some(raw) = value(name) else {
                return default;
            };
            let loc = ["query", name];
            let n = plain_digits(raw).then(|| raw.parse::<i64>().ok()).flatten();
            match n {
                Some(n) if (min..=max).contains(&n) => n,
                Some(_) => {
                    errors.push(FieldError::new(
                        "out_of_range",
                        &loc,
                        format!("Input should be between {min} and {max}"),
                    ));
                    default
                }
                None => {
                    errors.push(FieldError::new(
                        "int_parsing",
                        &loc,
                        "Input should be a non-negative integer written in decimal digits",
                    ));
                    default
                }
            }
        };
        let page = Page {
            limit: number("limit", 1, MAX_PAGE, DEFAULT_PAGE),
            after: number("after", 0, i64::MAX, 0),
        };
        if errors.is_empty() {
            Ok(page)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds(e: &[FieldError]) -> Vec<(&str, String)> {
        e.iter().map(|e| (e.kind, e.loc.join("."))).collect()
    }

    #[test]
    fn event_accepts_the_seed_shape() {
        let e = NewEvent::parse(&json!({"title": "Gig", "capacity": 100, "extra": 1})).unwrap();
        assert_eq!(
            e,
            NewEvent {
                title: "Gig".into(),
                capacity: 100,
                max_per_user: None
            }
        );
        let long = "é".repeat(200);
        assert!(NewEvent::parse(&json!({"title": long, "capacity": 1})).is_ok());
        // Integral numbers however written (JSON Schema's `integer`; the old service took them).
        for capacity in [json!(5.0), json!(5e0), json!(0.5e1)] {
            let e = NewEvent::parse(&json!({"title": "Gig", "capacity": capacity})).unwrap();
            assert_eq!(e.capacity, 5);
        }
    }

    #[test]
    fn event_rejects_each_bad_field() {
        let cases = [
            (json!({"capacity": 1}), "missing", "body.title"),
            (
                json!({"title": "", "capacity": 1}),
                "string_too_short",
                "body.title",
            ),
            (
                json!({"title": "x".repeat(201), "capacity": 1}),
                "string_too_long",
                "body.title",
            ),
            (
                json!({"title": "   ", "capacity": 1}),
                "string_blank",
                "body.title",
            ),
            (
                json!({"title": "a\u{0}b", "capacity": 1}),
                "string_control_chars",
                "body.title",
            ),
            (
                json!({"title": "\u{202e}txt.exe", "capacity": 1}),
                "string_invisible_chars",
                "body.title",
            ),
            (
                json!({"title": "Gig\u{200b}", "capacity": 1}),
                "string_invisible_chars",
                "body.title",
            ),
            (
                json!({"title": 5, "capacity": 1}),
                "string_type",
                "body.title",
            ),
            (
                json!({"title": "t", "capacity": 0}),
                "greater_than_equal",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": -5}),
                "greater_than_equal",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": "5"}),
                "int_type",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": 5.5}),
                "int_type",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": true}),
                "int_type",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": null}),
                "int_type",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": MAX_CAPACITY + 1}),
                "less_than_equal",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": u64::MAX}),
                "less_than_equal",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": 1e30}),
                "less_than_equal",
                "body.capacity",
            ),
            (
                json!({"title": "t", "capacity": -1e30}),
                "greater_than_equal",
                "body.capacity",
            ),
        ];
        for (body, kind, loc) in cases {
            let e = NewEvent::parse(&body).unwrap_err();
            assert_eq!(kinds(&e), vec![(kind, loc.to_string())], "{body}");
        }
    }

    #[test]
    fn the_per_customer_limit_is_optional_and_within_the_capacity() {
        let e = NewEvent::parse(&json!({"title": "t", "capacity": 10, "max_per_user": 4})).unwrap();
        assert_eq!(e.max_per_user, Some(4));
        let e = NewEvent::parse(&json!({"title": "t", "capacity": 10, "max_per_user": null}));
        assert_eq!(e.unwrap().max_per_user, None);
        for bad in [
            json!(0),
            json!(11),
            json!(-1),
            json!("4"),
            json!(2.5),
            json!(true),
        ] {
            let e = NewEvent::parse(&json!({"title": "t", "capacity": 10, "max_per_user": bad}))
                .unwrap_err();
            assert_eq!(
                e.iter().map(|e| e.loc.join(".")).collect::<Vec<_>>(),
                vec!["body.max_per_user"],
                "{bad}"
            );
        }
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(
            parse_idempotency_key(b"order-42 retry"),
            Ok("order-42 retry".into())
        );
        assert!(parse_idempotency_key(&[b'k'; 255]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; 256][..],
            b"a\nb",
            b"tab\t",
            "caf\u{e9}".as_bytes(),
            b"\x7f",
        ] {
            let e = parse_idempotency_key(bad).unwrap_err();
            assert_eq!(e.loc, vec!["header", "idempotency-key"]);
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let e = NewBooking::parse(&json!({"quantity": 0})).unwrap_err();
        assert_eq!(e.len(), 3);
        assert!(NewEvent::parse(&json!([1, 2])).is_err());
        assert!(NewEvent::parse(&json!("x")).is_err());
    }

    #[test]
    fn booking_rules() {
        let b = NewBooking::parse(&json!({"user_id": 1, "event_id": 2})).unwrap();
        assert_eq!(
            b,
            NewBooking {
                user_id: 1,
                event_id: EventId(2),
                quantity: 1
            }
        );
        let b = NewBooking::parse(&json!({"user_id": 1, "event_id": 2, "quantity": 3})).unwrap();
        assert_eq!(b.quantity, 3);
        for bad in [
            json!({"user_id": 0, "event_id": 1}),
            json!({"user_id": 1, "event_id": -1}),
            json!({"user_id": 1, "event_id": 9223372036854775808u64}),
            json!({"user_id": 1, "event_id": 1, "quantity": 0}),
            json!({"user_id": 1, "event_id": 1, "quantity": MAX_QUANTITY + 1}),
            json!({"user_id": "1", "event_id": 1}),
        ] {
            assert!(NewBooking::parse(&bad).is_err(), "{bad}");
        }
        let max = NewBooking::parse(&json!({"user_id": i64::MAX, "event_id": i64::MAX})).unwrap();
        assert_eq!(max.event_id, EventId(i64::MAX));
    }

    #[test]
    fn pages() {
        let q = |s: &[(&str, &str)]| -> Vec<(String, String)> {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            Page::parse(&q(&[])),
            Ok(Page {
                after: 0,
                limit: DEFAULT_PAGE
            })
        );
        assert_eq!(
            Page::parse(&q(&[("limit", "2"), ("after", "7"), ("x", "y")])),
            Ok(Page { after: 7, limit: 2 })
        );
        for bad in [
            ("limit", "0"),
            ("limit", "201"),
            ("limit", "+5"),
            ("after", "-1"),
        ] {
            let e = Page::parse(&q(&[bad])).unwrap_err();
            assert_eq!(e[0].loc.join("."), format!("query.{}", bad.0), "{bad:?}");
        }
    }

    #[test]
    fn path_ids() {
        assert_eq!(parse_path_id("42", "id"), Ok(42));
        for bad in [
            "0",
            "-1",
            "abc",
            "1.5",
            "9223372036854775808",
            "",
            " 1",
            "+1",
            "1_0",
        ] {
            assert!(parse_path_id(bad, "id").is_err(), "{bad}");
        }
        // A sign is not a number out of range: the message says what is wrong.
        let e = parse_path_id("-0", "id").unwrap_err();
        assert_eq!(e.kind, "int_parsing");
        assert_eq!(
            parse_path_id("00", "id").unwrap_err().kind,
            "greater_than_equal"
        );
    }
}
