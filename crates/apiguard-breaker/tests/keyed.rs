//! The keyed registry: its key-aware transition hook, and eviction when full.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, KeyedBreakers, Reason, State, Transition};

type Seen = Arc<Mutex<Vec<(String, State, Reason)>>>;

fn trip(b: &CircuitBreaker) {
    b.try_acquire().expect("closed").failure();
    assert_eq!(b.state(), State::Open);
}

#[test]
fn keyed_hook_gets_the_key_and_the_template_hook_still_runs() {
    let template_seen = Arc::new(Mutex::new(Vec::<Transition>::new()));
    let t = template_seen.clone();
    let breakers = KeyedBreakers::new(
        CircuitBreaker::builder()
            .failure_threshold(1)
            .recovery_timeout(Duration::from_secs(30))
            .on_transition(move |tr| t.lock().unwrap().push(*tr)),
        16,
    )
    .unwrap();
    // A breaker made before the hook is set gets it too.
    let early = breakers.get("early".to_owned());

    let keyed: Seen = Arc::default();
    let k = keyed.clone();
    let breakers = breakers.on_transition(move |key: &String, tr: &Transition| {
        k.lock().unwrap().push((key.clone(), tr.to, tr.reason));
    });
    let late = breakers.get("late".to_owned());

    trip(&early);
    trip(&late);
    breakers
        .get("held".to_owned())
        .hold_open_for(Duration::from_secs(1));

    assert_eq!(
        *keyed.lock().unwrap(),
        [
            ("early".to_owned(), State::Open, Reason::ConsecutiveFailures),
            ("late".to_owned(), State::Open, Reason::ConsecutiveFailures),
            ("held".to_owned(), State::Open, Reason::HeldOpen),
        ]
    );
    let template: Vec<_> = template_seen
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.reason)
        .collect();
    assert_eq!(
        template,
        [
            Reason::ConsecutiveFailures,
            Reason::ConsecutiveFailures,
            Reason::HeldOpen
        ]
    );
}

#[test]
fn keyed_hooks_compose_and_clones_share_them() {
    let breakers = KeyedBreakers::new(CircuitBreaker::builder().failure_threshold(1), 16).unwrap();
    let first: Seen = Arc::default();
    let second: Seen = Arc::default();
    let (f, s) = (first.clone(), second.clone());
    let clone = breakers.clone();
    let _ = breakers
        .on_transition(move |k: &u32, tr: &Transition| {
            f.lock().unwrap().push((k.to_string(), tr.to, tr.reason));
        })
        .on_transition(move |k: &u32, tr: &Transition| {
            s.lock().unwrap().push((k.to_string(), tr.to, tr.reason));
        });
    // The clone taken before the hooks were added is the same registry.
    trip(&clone.get(7));
    let want = [("7".to_owned(), State::Open, Reason::ConsecutiveFailures)];
    assert_eq!(*first.lock().unwrap(), want);
    assert_eq!(*second.lock().unwrap(), want);
}

#[test]
fn a_reclaimed_and_remade_breaker_keeps_the_keyed_hook() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let breakers = KeyedBreakers::new(CircuitBreaker::builder().failure_threshold(1), 4)
        .unwrap()
        .on_transition(move |k: &u32, tr: &Transition| {
            s.lock().unwrap().push((k.to_string(), tr.to, tr.reason));
        });
    // Fill and churn the registry so idle breakers are reclaimed.
    for key in 0..100u32 {
        breakers.get(key).try_acquire().unwrap().success();
    }
    assert!(breakers.len() <= 4);
    trip(&breakers.get(3));
    assert_eq!(
        *seen.lock().unwrap(),
        [("3".to_owned(), State::Open, Reason::ConsecutiveFailures)]
    );
}

#[test]
fn a_flood_into_a_full_registry_shares_the_overflow_breaker_and_keeps_busy_ones() {
    // Every breaker has counted a failure (none is idle), one is open.
    let breakers = KeyedBreakers::new(CircuitBreaker::builder().failure_threshold(3), 64).unwrap();
    for _ in 0..3 {
        breakers.get(0u32).try_acquire().unwrap().failure();
    }
    assert_eq!(breakers.state(&0), State::Open);
    for key in 1..64u32 {
        breakers.get(key).try_acquire().unwrap().failure();
    }
    assert_eq!(breakers.len(), 64);
    // The flood finds nothing idle: each new key gets the overflow breaker,
    // whose own failures trip it after three.
    for key in 64..20_000u32 {
        let b = breakers.get(key);
        if let Ok(permit) = b.try_acquire() {
            permit.failure();
        }
        assert!(breakers.len() <= 64, "{} breakers held", breakers.len());
    }
    assert_eq!(breakers.overflow().state(), State::Open);
    assert!(breakers.peek(&20_000).is_none());
    assert_eq!(breakers.state(&0), State::Open, "the open breaker survived");
    assert!(
        (1..64u32).all(|k| breakers.peek(&k).is_some()),
        "every busy breaker survived"
    );
}
