//! Hostile input: the header readers under arbitrary bytes (the fuzz
//! targets' invariants, run by proptest), the axum server stack under
//! huge, repeated and non-UTF-8 `X-Forwarded-For` over real sockets, and
//! absurd `Retry-After` values from an upstream through `GuardedClient`.
//!
//! Each case has one clear outcome, and none may panic, overflow or hang.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use apiguard::core::headers::parse_retry_after;
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::ForwardedFor;
use apiguard::server::server_layer;
use apiguard::{ErrorKind, GuardedClient};
use apiguard_suite::{Behavior, Upstream};
use axum::Router;
use axum::routing::get;
use http::{HeaderValue, StatusCode};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// The invariants the fuzz targets check (`fuzz/src/lib.rs`).
#[path = "../fuzz/src/lib.rs"]
#[allow(unreachable_pub, dead_code)]
mod checks;

// --- the header readers, fuzz-style -------------------------------------

/// Bytes shaped like header values: digits, dates, lists, parameters,
/// addresses, with any byte mixed in.
fn header_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        "[0-9]{1,25}".prop_map(String::into_bytes),
        "-?[0-9]{1,3}(\\.[0-9]{1,3}){0,3}(:[0-9]{1,6})?".prop_map(String::into_bytes),
        "\\[?[0-9a-fA-F:]{2,40}\\]?(:[0-9]{1,5})?".prop_map(String::into_bytes),
        "(Mon|Sun|Fri), [0-9]{1,2} (Jan|Dec|Foo) [0-9]{1,5} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
            .prop_map(String::into_bytes),
        "\"[a-z]{0,6}\";(q|r|t|w)=-?[0-9]{1,18}(;(q|r|t|w)=[0-9]{1,18})?"
            .prop_map(String::into_bytes),
        "(for|by|proto)=\"?[0-9a-f.:\\[\\]]{0,20}\"?".prop_map(String::into_bytes),
        prop::sample::select(vec![",", ";", " ", "\n", "\"", "=", "(", ")", "?"])
            .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn retry_after_reader_keeps_its_contract(data in header_like()) {
        checks::retry_after(&data);
    }

    #[test]
    fn retry_after_reader_survives_any_bytes(data in prop::collection::vec(any::<u8>(), 0..64)) {
        checks::retry_after(&data);
    }

    #[test]
    fn ratelimit_readers_keep_their_contract(data in header_like()) {
        checks::ratelimit_fields(&data);
    }

    #[test]
    fn ratelimit_readers_survive_any_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        checks::ratelimit_fields(&data);
    }

    #[test]
    fn forwarded_for_cannot_be_steered_from_the_left(
        first in any::<u8>(),
        data in header_like(),
    ) {
        let mut input = vec![first];
        input.extend_from_slice(&data);
        checks::forwarded_for(&input);
    }
}

#[test]
fn absurd_retry_after_values_read_as_documented() {
    let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let read = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
    assert_eq!(read("-1"), None);
    assert_eq!(read("99999999999999999999"), None, "overflow is garbage");
    assert_eq!(
        read("18446744073709551615"),
        Some(Duration::from_secs(u64::MAX))
    );
    assert_eq!(read("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
    let far = read("Fri, 31 Dec 9999 23:59:59 GMT").unwrap();
    assert!(far > Duration::from_secs(7_000 * 365 * 86_400), "{far:?}");
}

// --- the server stack over real sockets ------------------------------------

/// The server recipe: 3 requests per client, one more a minute, keyed by
/// the address one trusted proxy wrote into `X-Forwarded-For`.
async fn server() -> SocketAddr {
    let limiter = KeyedLimiter::from_rate(3, 1.0 / 60.0).unwrap();
    let app: Router = Router::new()
        .route("/", get(|| async { "hi" }))
        .layer(server_layer(limiter, ForwardedFor::x_forwarded_for(1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// Sends one raw request (the header lines as given, bytes and all) and
/// returns the response status; `None` if the server closed the connection
/// without answering. Never waits more than 5 s.
async fn raw(addr: SocketAddr, headers: &[&[u8]]) -> Option<u16> {
    let mut req = b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n".to_vec();
    for h in headers {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer (431) and close before reading it all.
        let _ = s.write_all(&req).await;
        let mut res = Vec::new();
        let _ = s.read_to_end(&mut res).await;
        res
    };
    let res = timeout(Duration::from_secs(5), exchange)
        .await
        .expect("the server answered or closed within 5 s");
    let line = String::from_utf8_lossy(&res);
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn xff(value: &str) -> Vec<u8> {
    format!("x-forwarded-for: {value}").into_bytes()
}

#[tokio::test]
async fn a_huge_forwarded_for_chain_is_keyed_by_its_last_hop_or_refused_431() {
    let addr = server().await;
    // 5,000 forged hops (about 70 kB): within hyper's header buffer, so
    // served, keyed by the hop the proxy wrote.
    let forged: Vec<String> = (0..5_000)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let chain = format!("{}, 203.0.113.1", forged.join(", "));
    for _ in 0..3 {
        assert_eq!(raw(addr, &[&xff(&chain)]).await, Some(200));
    }
    // A different forged prefix does not buy a fresh bucket.
    let other = format!("{}, 203.0.113.1", forged[..100].join(","));
    assert_eq!(raw(addr, &[&xff(&other)]).await, Some(429));

    // Past hyper's buffer (about 400 kB): refused before any handler runs.
    let giant = format!("{}, 203.0.113.2", vec!["192.0.2.1"; 60_000].join(", "));
    let status = raw(addr, &[&xff(&giant)]).await;
    assert!(matches!(status, Some(431) | None), "{status:?}");
    // And the server still serves everyone else.
    assert_eq!(raw(addr, &[&xff("203.0.113.3")]).await, Some(200));
}

#[tokio::test]
async fn repeated_forwarded_for_lines_are_one_chain_and_too_many_lines_are_refused() {
    let addr = server().await;
    // Fifty lines: one chain, read right to left; the last line's last hop
    // is the client (what the trusted proxy appended).
    let mut lines: Vec<Vec<u8>> = (0..49).map(|i| xff(&format!("10.0.0.{i}"))).collect();
    lines.push(xff("198.51.100.1"));
    let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    for _ in 0..3 {
        assert_eq!(raw(addr, &refs).await, Some(200));
    }
    assert_eq!(raw(addr, &[&xff("198.51.100.1")]).await, Some(429));
    assert_eq!(raw(addr, &[&xff("198.51.100.2")]).await, Some(200));

    // More header lines than hyper parses (100): 431, nothing reaches us.
    let many: Vec<Vec<u8>> = (0..500)
        .map(|i| xff(&format!("10.1.0.{}", i % 250)))
        .collect();
    let refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
    let status = raw(addr, &refs).await;
    assert!(matches!(status, Some(431) | None), "{status:?}");
}

#[tokio::test]
async fn a_non_utf8_forwarded_for_falls_back_to_the_peer_address() {
    let addr = server().await;
    // obs-text bytes are legal on the wire; the chain cannot be read, so
    // the key is the peer (127.0.0.1), whatever bytes each request sends.
    for junk in [&b"\xff\xfe\x80"[..], b"203.0.113.9\xc3\x28", b"\xe2\x82"] {
        let mut h = b"x-forwarded-for: ".to_vec();
        h.extend_from_slice(junk);
        assert_eq!(raw(addr, &[&h]).await, Some(200), "{junk:?}");
    }
    assert_eq!(
        raw(addr, &[b"x-forwarded-for: \xff"]).await,
        Some(429),
        "the peer's bucket is spent"
    );
    // Non-UTF-8 elsewhere changes nothing for a readable chain.
    assert_eq!(
        raw(addr, &[b"x-junk: \x80\x81\xff", &xff("203.0.113.10")]).await,
        Some(200)
    );
}

#[tokio::test]
async fn control_bytes_in_a_header_are_a_400_not_a_crash() {
    let addr = server().await;
    let status = raw(addr, &[b"x-forwarded-for: 203.0.113.1\x00\x01"]).await;
    assert!(matches!(status, Some(400) | None), "{status:?}");
    assert_eq!(raw(addr, &[&xff("203.0.113.1")]).await, Some(200));
}

// --- absurd Retry-After from an upstream, through GuardedClient ------------

#[tokio::test]
async fn absurd_retry_after_from_an_upstream_never_hangs_panics_or_overflows() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    let year_9999 = "Fri, 31 Dec 9999 23:59:59 GMT";
    let max_u64 = u64::MAX.to_string();
    let epoch = httpdate::fmt_http_date(UNIX_EPOCH);
    // (value, upstream calls it leads to, whether it holds the circuit open)
    let cases: [(&str, u64, bool); 6] = [
        // Not a delay: ignored, the normal backoff retries.
        ("-1", 4, false),
        // Overflows u64: garbage, ignored.
        ("99999999999999999999", 4, false),
        // Beyond max_retry_after (60 s): the 503 comes back at once, and
        // the breaker holds the host open for the capped 5 minutes.
        (year_9999, 1, true),
        (&max_u64, 1, true),
        // A date in the past asks for no wait: retried without delay.
        (&epoch, 4, false),
        ("Thursday, 01-Jan-70 00:00:00 GMT", 4, false),
    ];
    for (value, calls, held) in cases {
        // A client each: a hold is per client (and host).
        let c = GuardedClient::builder()
            .base_url(up.url())
            .max_retries(3)
            .base_delay(Duration::from_millis(10))
            .failure_threshold(1000)
            .attempt_timeout(Duration::from_millis(500))
            .total_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        up.set(Behavior::RawRetryAfter(value.to_owned()));
        let before = up.requests();
        let started = Instant::now();
        let res = c.put("/doc", "body").await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{value}");
        assert_eq!(up.requests() - before, calls, "{value}");
        assert!(started.elapsed() < Duration::from_secs(1), "{value}");

        up.set(Behavior::Ok);
        match c.get("/").await {
            Ok(res) if !held => assert_eq!(res.status(), StatusCode::OK),
            Err(e) if held && e.kind() == ErrorKind::CircuitOpen => {
                let wait = e.retry_after().unwrap();
                assert!(
                    wait > Duration::from_secs(290) && wait <= Duration::from_secs(300),
                    "{value}: held for {wait:?}"
                );
            }
            other => panic!("{value}: {other:?}"),
        }
    }
}
