//! HTTP header codecs: `Retry-After`, the IETF `RateLimit` fields and the
//! older `X-RateLimit-*` family.
//!
//! Parsers never panic and never fail loudly: a value they cannot read is
//! `None` (or an empty list), as if the header were absent.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};
use sfv::{BareItem, ListEntry, Parser};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Parses a `Retry-After` value (RFC 9110 §10.2.3) into the wait it asks for.
///
/// Both forms are read: delay-seconds (`120`) and HTTP-date in all three
/// syntaxes (IMF-fixdate, the obsolete RFC 850 and asctime forms). A date in
/// the past gives zero. Garbage, negative numbers, an empty value and
/// numbers that overflow give `None`.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if s.is_empty() {
        return None;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().ok().map(Duration::from_secs);
    }
    let date = httpdate::parse_http_date(s).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Writes a wait as `Retry-After` delay-seconds, rounded **up** to whole
/// seconds: a 300 ms wait is `1`, never `0`.
pub fn format_retry_after(wait: Duration) -> HeaderValue {
    HeaderValue::from(ceil_secs(wait))
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    }
}

/// One item of a `RateLimit-Policy` field: `"name";q=100;w=60`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyItem {
    /// The policy's name.
    pub name: String,
    /// Quota units allowed per window (`q`).
    pub quota: u64,
    /// The window, whole seconds (`w`), when given.
    pub window: Option<Duration>,
}

/// One item of a `RateLimit` field: `"name";r=42;t=3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitItem {
    /// The policy's name.
    pub name: String,
    /// Quota units left (`r`).
    pub remaining: u64,
    /// Time until the quota is restored (`t`), when given.
    pub reset: Option<Duration>,
}

/// Writes a `RateLimit-Policy` item, e.g. `"default";q=100;w=60`. The window
/// is rounded up to whole seconds (and to at least one).
pub fn format_ratelimit_policy(name: &str, quota: u64, window: Duration) -> HeaderValue {
    let mut buf = BytesMut::with_capacity(32);
    push_name(&mut buf, name);
    buf.extend_from_slice(b";q=");
    push_u64(&mut buf, quota);
    buf.extend_from_slice(b";w=");
    push_u64(&mut buf, ceil_secs(window).max(1));
    to_value(buf)
}

/// Writes a `RateLimit` item, e.g. `"default";r=42;t=3`; `t` is rounded up.
pub fn format_ratelimit(name: &str, remaining: u64, reset: Duration) -> HeaderValue {
    let mut buf = BytesMut::with_capacity(32);
    push_name(&mut buf, name);
    buf.extend_from_slice(b";r=");
    push_u64(&mut buf, remaining);
    buf.extend_from_slice(b";t=");
    push_u64(&mut buf, ceil_secs(reset));
    to_value(buf)
}

// Structured-field integers hold at most 15 digits.
const SF_MAX: u64 = 999_999_999_999_999;

fn push_u64(buf: &mut BytesMut, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n.min(SF_MAX)).as_bytes());
}

fn push_name(buf: &mut BytesMut, name: &str) {
    buf.extend_from_slice(b"\"");
    for b in name.bytes() {
        // sf-string: printable ASCII; escape `"` and `\`, drop the rest.
        if b == b'"' || b == b'\\' {
            buf.extend_from_slice(&[b'\\', b]);
        } else if (0x20..0x7f).contains(&b) {
            buf.extend_from_slice(&[b]);
        }
    }
    buf.extend_from_slice(b"\"");
}

fn to_value(buf: BytesMut) -> HeaderValue {
    // Only printable ASCII was written above.
    HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Reads every well-formed item of one or more `RateLimit-Policy` field
/// lines. Items without a non-negative `q` are skipped; a line that is not a
/// structured-field list is ignored.
pub fn parse_ratelimit_policy<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Vec<PolicyItem> {
    let mut out = Vec::new();
    for value in values {
        for (name, params) in list_items(value) {
            let Some(quota) = int_param(&params, "q") else {
                continue;
            };
            let window = int_param(&params, "w").map(Duration::from_secs);
            out.push(PolicyItem {
                name,
                quota,
                window,
            });
        }
    }
    out
}

/// Reads every well-formed item of one or more `RateLimit` field lines.
/// Items without a non-negative `r` are skipped.
pub fn parse_ratelimit<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Vec<LimitItem> {
    let mut out = Vec::new();
    for value in values {
        for (name, params) in list_items(value) {
            let Some(remaining) = int_param(&params, "r") else {
                continue;
            };
            let reset = int_param(&params, "t").map(Duration::from_secs);
            out.push(LimitItem {
                name,
                remaining,
                reset,
            });
        }
    }
    out
}

/// The wait a response's `RateLimit` field asks for: the longest `t` among
/// the policies with nothing left (`r=0`), if any.
pub fn ratelimit_reset(headers: &HeaderMap) -> Option<Duration> {
    parse_ratelimit(headers.get_all(RATELIMIT))
        .into_iter()
        .filter(|item| item.remaining == 0)
        .filter_map(|item| item.reset)
        .max()
}

/// The `X-RateLimit-Limit` / `-Remaining` / `-Reset` fields (GitHub,
/// Twitter/X and many others), or the same names without the `X-` prefix
/// (early drafts of the IETF fields).
///
/// Each is read on its own; a field that is absent, repeated with a
/// different value, negative, fractional where a count is expected, or
/// longer than 19 digits is `None`. `Reset` is read as a number of seconds
/// (fractions allowed) until the quota is restored, unless it is large
/// enough to be a Unix time (at least 10⁹, i.e. after September 2001), in
/// which case it is read as the instant of the reset, measured from `now`
/// (an instant in the past gives zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XRateLimit {
    /// Requests allowed per window (`-Limit`).
    pub limit: Option<u64>,
    /// Requests left in this window (`-Remaining`).
    pub remaining: Option<u64>,
    /// Time until the window resets (`-Reset`).
    pub reset: Option<Duration>,
}

/// Names of the `X-RateLimit-*` family, and of their unprefixed twins.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// See [`X_RATELIMIT_LIMIT`].
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// See [`X_RATELIMIT_LIMIT`].
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Unix times at or above this are read as instants, below as delays.
const EPOCH_THRESHOLD: u64 = 1_000_000_000;

/// Reads the `X-RateLimit-*` fields (or their unprefixed twins) of a
/// response; `None` when none of the three is there in a readable form.
pub fn parse_x_ratelimit(headers: &HeaderMap, now: SystemTime) -> Option<XRateLimit> {
    let pick = |x: &HeaderName, plain: &HeaderName| {
        one_value(headers, x).or_else(|| one_value(headers, plain))
    };
    let limit = pick(&X_RATELIMIT_LIMIT, &RATELIMIT_LIMIT).and_then(parse_count);
    let remaining = pick(&X_RATELIMIT_REMAINING, &RATELIMIT_REMAINING).and_then(parse_count);
    let reset = pick(&X_RATELIMIT_RESET, &RATELIMIT_RESET).and_then(|v| parse_reset(v, now));
    if limit.is_none() && remaining.is_none() && reset.is_none() {
        return None;
    }
    Some(XRateLimit {
        limit,
        remaining,
        reset,
    })
}

/// The field's value when it has exactly one, or several that agree.
fn one_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?.trim();
    for other in values {
        if other.to_str().ok()?.trim() != first {
            return None;
        }
    }
    Some(first)
}

/// A non-negative integer of at most 19 digits.
fn parse_count(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Seconds until a reset (`12`, `0.734`) or the Unix time of it.
fn parse_reset(s: &str, now: SystemTime) -> Option<Duration> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs = parse_count(whole)?;
    if !frac.is_empty() && (frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    if s.ends_with('.') {
        return None;
    }
    if secs >= EPOCH_THRESHOLD {
        let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        // Right-pad to nine digits: "734" is 734_000_000 ns.
        let digits: u32 = frac.parse().ok()?;
        digits * 10u32.pow(9 - frac.len() as u32)
    };
    Some(Duration::new(secs, nanos))
}

fn list_items(value: &HeaderValue) -> Vec<(String, sfv::Parameters)> {
    let Ok(list) = Parser::new(value.as_bytes()).parse::<sfv::List>() else {
        return Vec::new();
    };
    list.into_iter()
        .filter_map(|entry| match entry {
            ListEntry::Item(item) => {
                let name = match &item.bare_item {
                    BareItem::String(s) => s.as_str().to_owned(),
                    BareItem::Token(t) => t.as_str().to_owned(),
                    _ => return None,
                };
                Some((name, item.params))
            }
            ListEntry::InnerList(_) => None,
        })
        .collect()
}

fn int_param(params: &sfv::Parameters, key: &str) -> Option<u64> {
    match params.get(key)? {
        BareItem::Integer(i) => u64::try_from(i64::from(*i)).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> SystemTime {
        // Sun, 06 Nov 1994 08:49:37 GMT
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn parse(s: &str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_str(s).unwrap(), now())
    }

    #[test]
    fn retry_after_delay_seconds() {
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse(" 5 "), Some(Duration::from_secs(5)));
    }

    #[test]
    fn retry_after_all_three_date_forms() {
        // Two seconds after `now()`, in each syntax RFC 9110 names.
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:39 GMT"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse("Sunday, 06-Nov-94 08:49:39 GMT"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse("Sun Nov  6 08:49:39 1994"),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn retry_after_date_in_the_past_is_zero() {
        assert_eq!(parse("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage_is_none() {
        for s in [
            "",
            "-1",
            "+5",
            "1.5",
            "soon",
            "99999999999999999999",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "0x10",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
        let bytes = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(parse_retry_after(&bytes, now()), None);
    }

    #[test]
    fn retry_after_far_future_date_does_not_overflow() {
        let d = parse("Fri, 31 Dec 9999 23:59:59 GMT").unwrap();
        assert!(d > Duration::from_secs(200 * 365 * 86_400));
    }

    #[test]
    fn format_rounds_up() {
        assert_eq!(format_retry_after(Duration::from_millis(300)), "1");
        assert_eq!(format_retry_after(Duration::ZERO), "0");
        assert_eq!(format_retry_after(Duration::from_secs(2)), "2");
        assert_eq!(format_retry_after(Duration::from_millis(2001)), "3");
        assert_eq!(
            format_retry_after(Duration::MAX),
            u64::MAX.to_string().as_str()
        );
    }

    #[test]
    fn ratelimit_fields_round_trip() {
        let p = format_ratelimit_policy("default", 100, Duration::from_secs(60));
        assert_eq!(p, "\"default\";q=100;w=60");
        let r = format_ratelimit("default", 42, Duration::from_millis(2_500));
        assert_eq!(r, "\"default\";r=42;t=3");
        assert_eq!(
            parse_ratelimit_policy([&p]),
            vec![PolicyItem {
                name: "default".into(),
                quota: 100,
                window: Some(Duration::from_secs(60))
            }]
        );
        assert_eq!(
            parse_ratelimit([&r]),
            vec![LimitItem {
                name: "default".into(),
                remaining: 42,
                reset: Some(Duration::from_secs(3))
            }]
        );
    }

    #[test]
    fn ratelimit_reader_skips_malformed_items() {
        let v = HeaderValue::from_static(
            "\"a\";r=-1;t=3, \"b\";r=0;t=7, (\"c\");r=1, \"d\";t=4, \"e\";r=0;t=2",
        );
        let items = parse_ratelimit([&v]);
        assert_eq!(
            items.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["b", "e"]
        );
        let mut headers = HeaderMap::new();
        headers.append(RATELIMIT, v);
        headers.append(RATELIMIT, HeaderValue::from_static("not a ; list ;;"));
        assert_eq!(ratelimit_reset(&headers), Some(Duration::from_secs(7)));
        assert!(parse_ratelimit_policy([&HeaderValue::from_static("q=1,,")]).is_empty());
    }

    #[test]
    fn policy_names_are_escaped() {
        let p = format_ratelimit_policy("we\"ird\\\u{7}", 1, Duration::from_millis(1));
        assert_eq!(p, "\"we\\\"ird\\\\\";q=1;w=1");
        assert_eq!(parse_ratelimit_policy([&p])[0].name, "we\"ird\\");
    }

    fn x_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn x_ratelimit_fields_are_read_with_delays_and_unix_times() {
        let h = x_headers(&[
            ("x-ratelimit-limit", "60"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "12"),
        ]);
        assert_eq!(
            parse_x_ratelimit(&h, now()),
            Some(XRateLimit {
                limit: Some(60),
                remaining: Some(0),
                reset: Some(Duration::from_secs(12)),
            })
        );
        // GitHub's form: the Unix time of the reset.
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = x_headers(&[("x-ratelimit-reset", "1700000030")]);
        assert_eq!(
            parse_x_ratelimit(&h, later).unwrap().reset,
            Some(Duration::from_secs(30))
        );
        // A reset instant already past is no wait at all.
        let h = x_headers(&[("x-ratelimit-reset", "1600000000")]);
        assert_eq!(
            parse_x_ratelimit(&h, later).unwrap().reset,
            Some(Duration::ZERO)
        );
        let h = x_headers(&[("ratelimit-remaining", "3"), ("ratelimit-reset", "0.25")]);
        let x = parse_x_ratelimit(&h, now()).unwrap();
        assert_eq!(x.remaining, Some(3));
        assert_eq!(x.reset, Some(Duration::from_millis(250)));
    }

    #[test]
    fn x_ratelimit_garbage_is_none() {
        for v in [
            "-1",
            "1e3",
            "",
            "abc",
            "99999999999999999999",
            "1.",
            ".5",
            "1.2.3",
        ] {
            let h = x_headers(&[
                ("x-ratelimit-limit", v),
                ("x-ratelimit-remaining", v),
                ("x-ratelimit-reset", v),
            ]);
            assert_eq!(parse_x_ratelimit(&h, now()), None, "{v:?}");
        }
        // Disagreeing repeats are not trusted; agreeing ones are.
        let h = x_headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-remaining", "5"),
        ]);
        assert_eq!(parse_x_ratelimit(&h, now()), None);
        let h = x_headers(&[
            ("x-ratelimit-remaining", "5"),
            ("x-ratelimit-remaining", "5"),
        ]);
        assert_eq!(parse_x_ratelimit(&h, now()).unwrap().remaining, Some(5));
        assert_eq!(parse_x_ratelimit(&HeaderMap::new(), now()), None);
    }

    proptest! {
        #[test]
        fn retry_after_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = parse_retry_after(&v, now());
                let _ = parse_ratelimit([&v]);
                let _ = parse_ratelimit_policy([&v]);
                let mut h = HeaderMap::new();
                h.insert(X_RATELIMIT_RESET, v.clone());
                h.insert(X_RATELIMIT_REMAINING, v);
                let _ = parse_x_ratelimit(&h, now());
            }
        }

        #[test]
        fn delay_seconds_round_trip(secs in 0u64..=u64::MAX) {
            let v = format_retry_after(Duration::from_secs(secs));
            prop_assert_eq!(parse_retry_after(&v, now()), Some(Duration::from_secs(secs)));
        }

        #[test]
        fn format_never_undershoots(nanos in any::<u64>()) {
            let d = Duration::from_nanos(nanos);
            let v = format_retry_after(d);
            let back = parse_retry_after(&v, now()).unwrap();
            prop_assert!(back >= d && back - d < Duration::from_secs(1));
        }
    }
}
