//! Loom models of the retry budget's lock-free slots: every interleaving of
//! two threads depositing and withdrawing.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p apiguard-retry --test loom --release
//! ```
#![cfg(loom)]

use std::time::Duration;

use apiguard_core::ManualClock;
use apiguard_retry::RetryBudget;
use loom::thread;

fn budget(floor: u32, ratio: f64) -> RetryBudget {
    // The clock stands still: every operation lands in one slot.
    RetryBudget::with_clock(
        Duration::from_secs(10),
        floor,
        ratio,
        ManualClock::new().clock(),
    )
    .unwrap()
}

#[test]
fn racing_deposits_and_withdrawals_lose_no_update() {
    loom::model(|| {
        let b = budget(0, 1.0);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || {
                    b.deposit();
                    b.try_withdraw()
                })
            })
            .collect();
        let granted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|g| *g)
            .count();
        // Each thread's own deposit is there when it withdraws.
        assert_eq!(granted, 2);
        assert_eq!(b.available(), 0.0);
    });
}

#[test]
fn racing_withdrawals_overdraw_by_at_most_the_racers_and_keep_count() {
    loom::model(|| {
        let b = budget(0, 1.0);
        b.deposit();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.try_withdraw())
            })
            .collect();
        let granted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|g| *g)
            .count();
        assert!((1..=2).contains(&granted));
        // Every withdrawal was recorded: two more deposits leave 3 - granted.
        b.deposit();
        b.deposit();
        assert_eq!(b.available(), 3.0 - granted as f64);
    });
}

#[test]
fn deposits_and_a_withdrawal_across_slots_keep_count_and_expire_on_time() {
    const SEC: u64 = 1_000_000_000;
    loom::model(|| {
        // 10 slots of one second each.
        let b = budget(0, 1.0);
        let (b1, b2, b3) = (b.clone(), b.clone(), b.clone());
        let early = thread::spawn(move || b1.deposit_at(SEC / 2)); // slot 0
        let late = thread::spawn(move || b2.deposit_at(SEC + SEC / 5)); // slot 1
        let withdraw = thread::spawn(move || b3.try_withdraw_at(SEC + SEC / 2));
        early.join().unwrap();
        late.join().unwrap();
        // Granted exactly when it saw a deposit that had landed.
        let granted = withdraw.join().unwrap();
        let spent = f64::from(u8::from(granted));
        assert_eq!(b.available_at(SEC + SEC / 2), 2.0 - spent);
        // Ten seconds on, slot 0 has expired: only the late deposit and
        // the withdrawal (in slot 1) still count.
        assert_eq!(b.available_at(10 * SEC + SEC / 2), 1.0 - spent);
    });
}
