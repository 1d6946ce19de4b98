//! The invariants the fuzz targets check, one function per target.
//!
//! Each takes raw bytes as they might arrive on the wire and panics only if
//! a reader breaks its contract: a reader must never panic, must read a
//! value the same way every time, and must agree with its writer. The root
//! test suite runs these same functions under proptest (`tests/hostile.rs`),
//! so a stable toolchain exercises them too.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_core::headers::{
    RATELIMIT, ceil_secs, format_ratelimit, format_ratelimit_policy, format_retry_after,
    parse_ratelimit, parse_ratelimit_policy, parse_retry_after, ratelimit_reset,
};
use apiguard_ratelimit::extract::ForwardedFor;
use http::{HeaderMap, HeaderName, HeaderValue};

/// A fixed "now" (2025-06-15) so runs are reproducible.
const NOW: u64 = 1_750_000_000;

fn nows() -> [SystemTime; 3] {
    [
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(NOW),
        // Past the last date an HTTP-date can name.
        UNIX_EPOCH + Duration::from_secs(300_000_000_000),
    ]
}

/// `Retry-After`: any bytes read without panicking; digits read exactly;
/// a wait written by `format_retry_after` reads back rounded up.
pub fn retry_after(data: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let read = nows().map(|now| parse_retry_after(&value, now));
        let text = value.to_str().map(str::trim).unwrap_or("");
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            let expected = text.parse::<u64>().ok().map(Duration::from_secs);
            assert!(read.iter().all(|r| *r == expected), "{text:?}: {read:?}");
        }
        // A date is never further away from an earlier "now".
        if let (Some(early), Some(late)) = (read[0], read[1]) {
            assert!(early >= late, "{value:?}: {early:?} < {late:?}");
        }
    }
    // Any wait the data spells, written and read back.
    let mut raw = [0u8; 12];
    let n = data.len().min(12);
    raw[..n].copy_from_slice(&data[..n]);
    let secs = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
    let nanos = u32::from_le_bytes(raw[8..].try_into().unwrap_or_default()) % 1_000_000_000;
    let wait = Duration::new(secs, nanos);
    let written = format_retry_after(wait);
    let back = parse_retry_after(&written, SystemTime::now());
    assert_eq!(back, Some(Duration::from_secs(ceil_secs(wait))), "{wait:?}");
    // Never rounded down, short of the u64::MAX seconds the field can hold.
    assert!(
        back.unwrap() >= wait || wait.as_secs() == u64::MAX,
        "rounded down: {wait:?}"
    );
}

/// `RateLimit` and `RateLimit-Policy`: every line of the data is a field
/// line; reading never panics, never yields a negative or missing quota,
/// and the writers' output reads back.
pub fn ratelimit_fields(data: &[u8]) {
    let values: Vec<HeaderValue> = data
        .split(|b| *b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    let policies = parse_ratelimit_policy(&values);
    let limits = parse_ratelimit(&values);
    let mut headers = HeaderMap::new();
    for v in &values {
        headers.append(RATELIMIT, v.clone());
    }
    let reset = ratelimit_reset(&headers);
    // The reset is one of the items with nothing left.
    if let Some(reset) = reset {
        assert!(
            limits
                .iter()
                .any(|l| l.remaining == 0 && l.reset == Some(reset))
        );
    }
    // Reading twice gives the same answer.
    assert_eq!(policies, parse_ratelimit_policy(&values));
    assert_eq!(limits, parse_ratelimit(&values));

    // The writers, fed a name and numbers taken from the data.
    let (name_bytes, nums) = data.split_at(data.len().saturating_sub(16));
    let name = String::from_utf8_lossy(name_bytes);
    let mut raw = [0u8; 16];
    raw[..nums.len()].copy_from_slice(nums);
    let a = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
    let b = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
    let window = Duration::from_millis(b % (1 << 50));
    let policy = parse_ratelimit_policy([&format_ratelimit_policy(&name, a, window)]);
    assert_eq!(policy.len(), 1, "{name:?} {a} {window:?}");
    assert_eq!(policy[0].quota, a.min(999_999_999_999_999));
    let limit = parse_ratelimit([&format_ratelimit(&name, a, window)]);
    assert_eq!(limit.len(), 1, "{name:?} {a} {window:?}");
    assert_eq!(limit[0].remaining, a.min(999_999_999_999_999));
    assert_eq!(policy[0].name, limit[0].name, "one name, written twice");
    // The reset is never earlier than asked (up to the field's limit).
    let reset = limit[0].reset.expect("t is written");
    assert!(reset >= window.min(Duration::from_secs(999_999_999_999_999)));
}

/// The forwarded-for extractor: the first byte picks the trusted hops and
/// the header, each further line is one field line. Never panics, and what
/// the client writes on the left of the chain cannot change the answer.
pub fn forwarded_for(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let hops = usize::from(first % 8);
    let standard = first & 0x80 != 0;
    let (extractor, name, forged) = if standard {
        (
            ForwardedFor::forwarded(hops),
            http::header::FORWARDED,
            "for=198.51.100.66, ",
        )
    } else {
        (
            ForwardedFor::x_forwarded_for(hops),
            HeaderName::from_static("x-forwarded-for"),
            "198.51.100.66, ",
        )
    };
    let lines: Vec<HeaderValue> = rest
        .split(|b| *b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    let mut headers = HeaderMap::new();
    for v in &lines {
        headers.append(name.clone(), v.clone());
    }
    let found: Option<IpAddr> = extractor.from_headers(&headers);
    if hops == 0 {
        assert_eq!(found, None, "zero trusted hops ignores the header");
    }
    // A client prepends a forged hop to the leftmost line.
    let Some(leftmost) = lines.first() else {
        assert_eq!(found, None);
        return;
    };
    let mut forged_bytes = forged.as_bytes().to_vec();
    forged_bytes.extend_from_slice(leftmost.as_bytes());
    let Ok(forged_value) = HeaderValue::from_bytes(&forged_bytes) else {
        return;
    };
    let mut spoofed = HeaderMap::new();
    spoofed.append(name.clone(), forged_value);
    for v in &lines[1..] {
        spoofed.append(name.clone(), v.clone());
    }
    if found.is_some() {
        assert_eq!(
            extractor.from_headers(&spoofed),
            found,
            "a forged hop on the left moved the key"
        );
    }
}
