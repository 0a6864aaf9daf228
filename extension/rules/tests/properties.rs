//! Randomised property tests of the validators: on any input they never
//! panic, and they accept exactly what an independent statement of the rule
//! accepts. PM_PROPTEST_CASES (default 20000) and PM_PROPTEST_SEED make runs
//! longer or reproducible.
use polar_meter_rules::validate;
use serde_json::{Map, Value};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn string(&mut self, max: u64) -> String {
        let len = self.below(max + 1);
        (0..len)
            .map(|_| match self.below(10) {
                0 => '\0',
                1 => ' ',
                2 => 'é',
                3 => '😀',
                4 => char::from_u32(self.below(0x7f) as u32).unwrap_or('x'),
                5 => '\u{7f}',
                _ => (b'a' + self.below(26) as u8) as char,
            })
            .collect()
    }
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(self.below(2) == 0),
            2 => serde_json::from_str(
                [
                    "1e400",
                    "-0",
                    "3.5",
                    "123456789012345678901234567890",
                    "-7",
                    "1e308",
                    "1e-16383",
                    "1E+5",
                    "1e63",
                    "1e64",
                    "-1.5e-60",
                    "0.000",
                ][self.below(12) as usize],
            )
            .unwrap(),
            3 | 4 => {
                let max = if self.below(4) == 0 { 600 } else { 20 };
                Value::String(self.string(max))
            }
            5 => Value::Array((0..self.below(3)).map(|_| self.value(depth + 1)).collect()),
            _ => Value::Object(
                (0..self.below(4))
                    .map(|_| (self.string(8), self.value(depth + 1)))
                    .collect(),
            ),
        }
    }
}

fn cases() -> (u64, u64) {
    let n = std::env::var("PM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed = std::env::var("PM_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    (n, seed)
}

/// A JSON number as PostgreSQL's numeric prints it, built digit by digit
/// (None past a thousand digits either way: far over any bound).
fn numeric_printed(literal: &str) -> Option<String> {
    let (sign, body) = literal
        .strip_prefix('-')
        .map_or(("", literal), |b| ("-", b));
    let (mantissa, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (body, 0),
    };
    if exp.abs() > 1000 {
        return None;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = format!("{int}{frac}");
    let mut point = int.len() as i64 + exp;
    let scale = (frac.len() as i64 - exp).max(0) as usize;
    while point > digits.len() as i64 {
        digits.push('0');
    }
    while point < 1 {
        digits.insert(0, '0');
        point += 1;
    }
    let (whole, rest) = digits.split_at(point as usize);
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let mut rest = rest.to_string();
    while rest.len() < scale {
        rest.push('0');
    }
    let text = if scale > 0 {
        format!("{whole}.{}", &rest[..scale])
    } else {
        whole.to_string()
    };
    let zero = text.bytes().all(|b| b == b'0' || b == b'.');
    Some(if zero { text } else { format!("{sign}{text}") })
}

#[test]
fn numbers_print_as_postgresql_prints_them() {
    for (literal, printed) in [
        ("1E+5", "100000"),
        ("1.50", "1.50"),
        ("-0", "0"),
        ("0.000", "0.000"),
        ("1e-3", "0.001"),
        ("-1.5e-2", "-0.015"),
        ("120e-1", "12.0"),
    ] {
        assert_eq!(
            numeric_printed(literal).as_deref(),
            Some(printed),
            "{literal}"
        );
    }
}

/// The metadata rule, stated independently.
fn metadata_ok(v: &Value) -> bool {
    let Some(m) = v.as_object() else { return false };
    m.len() <= 49
        && m.iter().all(|(k, v)| {
            let kl = k.chars().count();
            (1..=40).contains(&kl)
                && !k.contains('\0')
                && k != "meter_event_id"
                && match v {
                    Value::String(s) => (1..=500).contains(&s.chars().count()) && !s.contains('\0'),
                    Value::Number(n) => {
                        numeric_printed(&n.to_string()).is_some_and(|t| t.len() <= 64)
                    }
                    Value::Bool(_) => true,
                    _ => false,
                }
        })
}

#[test]
fn metadata_accepts_exactly_the_rule() {
    let (n, seed) = cases();
    let mut r = Rng(seed);
    let mut accepted = 0;
    for _ in 0..n {
        let v = if r.below(3) == 0 {
            r.value(0)
        } else {
            let keys = if r.below(10) == 0 {
                45 + r.below(10)
            } else {
                r.below(6)
            };
            Value::Object(
                (0..keys)
                    .map(|i| (format!("{}{}", r.string(42), i), r.value(1)))
                    .collect::<Map<_, _>>(),
            )
        };
        let got = validate::metadata(&v);
        assert_eq!(got.is_ok(), metadata_ok(&v), "seed {seed}: {v}");
        if let Err(e) = got {
            assert_eq!(e.sqlstate, "PM013");
            assert!(e.message.contains("metadata"), "{}", e.message);
        } else {
            accepted += 1;
        }
    }
    assert!(
        accepted > n / 20,
        "the generator reaches accepted inputs too ({accepted})"
    );
}

#[test]
fn names_and_idempotency_keys_accept_exactly_the_rule() {
    let (n, seed) = cases();
    let mut r = Rng(seed ^ 0x5555);
    for _ in 0..n {
        let max = if r.below(5) == 0 { 300 } else { 40 };
        let s = r.string(max);
        let name_ok = (1..=128).contains(&s.chars().count()) && !s.contains('\0');
        assert_eq!(validate::event_name(&s).is_ok(), name_ok, "{s:?}");
        let idem_ok = (1..=255).contains(&s.len())
            && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
            && !s.starts_with(' ')
            && !s.ends_with(' ');
        assert_eq!(validate::idempotency_key(&s).is_ok(), idem_ok, "{s:?}");
    }
}

#[test]
fn timestamps_never_panic_and_accepted_ones_carry_a_zone() {
    let (n, seed) = cases();
    let mut r = Rng(seed ^ 0xaaaa);
    let parts = [
        "2026", "-", "01", "31", "T", "t", " ", "12", ":", "00", ".123", "Z", "z", "+02:00",
        "-0530", "1969", "0000", "9999", "13", "60",
    ];
    for _ in 0..n {
        let s: String = (0..r.below(12))
            .map(|_| parts[r.below(parts.len() as u64) as usize])
            .collect();
        if let Ok(t) = validate::event_timestamp_text(&s) {
            let lower = s.to_ascii_lowercase();
            assert!(
                lower.ends_with('z') || s.rfind(['+', '-']).is_some_and(|i| i > 10),
                "accepted without a zone: {s:?}"
            );
            assert!(t >= 0, "before 1970 accepted: {s:?}");
        }
    }
}
