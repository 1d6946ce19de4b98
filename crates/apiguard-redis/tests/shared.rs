//! Many instances — tasks with their own connections, and another OS
//! process — share one limit.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use apiguard_redis::{DecidedBy, FailurePolicy, Quota, RedisLimiter};
use tokio::time::Instant;

const LIMIT: u64 = 100;
const BURST: u64 = 20;
const RUN: Duration = Duration::from_secs(3);
const KEY: &str = "shared";
const URL_VAR: &str = "APIGUARD_REDIS_TEST_URL";

async fn instance(url: &str) -> RedisLimiter {
    RedisLimiter::builder(Quota::per_second(LIMIT).with_burst(BURST))
        // Timeouts would only blur the count; fail closed so they could not
        // inflate it either.
        .timeout(Duration::from_millis(500))
        .on_redis_failure(FailurePolicy::fail_closed())
        .connect(url)
        .await
        .expect("instance connects")
}

/// Asks for a token every 2 ms (about 5× the limit per instance) for
/// `RUN`, and counts the grants.
async fn hammer(l: RedisLimiter) -> u64 {
    let start = Instant::now();
    let mut admitted = 0;
    while start.elapsed() < RUN {
        let d = l.decide(KEY, 1, Duration::ZERO).await;
        assert_eq!(d.decided_by, DecidedBy::Redis);
        admitted += u64::from(d.allowed);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    admitted
}

/// The other process: run by `instances_in_tasks_and_another_process_share_one_limit`
/// through this test binary, and a no-op anywhere else.
#[tokio::test]
#[ignore = "helper: run as a child process by the shared-limit test"]
async fn child_process_instance() {
    let Ok(url) = std::env::var(URL_VAR) else {
        return;
    };
    let admitted = hammer(instance(&url).await).await;
    println!("ADMITTED={admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_in_tasks_and_another_process_share_one_limit() {
    let server = redis_or_skip!();
    let url = server.url();
    let mut con = server.client();
    let t0 = common::redis_time_us(&mut con);

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_instance",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(URL_VAR, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the test binary runs again");

    let mut tasks = Vec::new();
    for _ in 0..3 {
        let l = instance(&url).await;
        tasks.push(tokio::spawn(hammer(l)));
    }
    let mut ours = 0;
    for t in tasks {
        ours += t.await.unwrap();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ADMITTED="))
        .expect("the child reports its count")
        .trim()
        .parse()
        .unwrap();
    let elapsed_us = common::redis_time_us(&mut con) - t0;

    let total = ours + theirs;
    let allowed = BURST + LIMIT * elapsed_us / 1_000_000;
    eprintln!("admitted {total} (here {ours}, child {theirs}) in {elapsed_us} µs; bound {allowed}");
    assert!(
        total <= allowed + BURST,
        "admitted {total} (here {ours}, child {theirs}), limit over the run {allowed}"
    );
    // Demand was several times the limit throughout, so the limit was
    // (nearly) all used: this fails if instances each got their own.
    assert!(
        total >= LIMIT * RUN.as_secs() * 8 / 10,
        "admitted only {total}"
    );
    assert!(theirs > 0 && ours > 0, "here {ours}, child {theirs}");
}
