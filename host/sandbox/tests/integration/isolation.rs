//! A plugin is untrusted code in a box: fresh instance per call, CPU
//! deadline, memory cap, typed failures. These run the real components.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::{get, sandbox, spec};
use breakwater_sandbox::{
    FailureKind, Isolation, Limits, LoadedPlugin, OnFailure, RequestDecision, Sandbox,
};

fn header<'d>(decision: &'d RequestDecision, name: &str) -> Option<&'d str> {
    match decision {
        RequestDecision::ContinueWith(changes) => changes
            .set_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str()),
        _ => None,
    }
}

#[test]
fn a_global_in_one_request_is_unseen_by_the_next() {
    let sandbox = sandbox();
    let plugin = sandbox
        .load(spec("count", "fixture_misbehave", r#"{"mode":"count"}"#))
        .expect("load");
    for _ in 0..5 {
        let decision = plugin.on_request(&get("/")).expect("call").decision;
        assert_eq!(header(&decision, "x-count"), Some("1"), "{decision:?}");
    }
    // Concurrent calls reuse pool slots in any order; none sees another's state.
    let plugin = Arc::new(plugin);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let plugin = Arc::clone(&plugin);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let decision = plugin.on_request(&get("/")).expect("call").decision;
                    assert_eq!(header(&decision, "x-count"), Some("1"), "{decision:?}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("no thread saw a leaked global");
    }
}

/// The `count` fixture as plugin `name`, its instances reused.
fn reused_counter(sandbox: &Sandbox, name: &str, recycle_after: u64) -> LoadedPlugin {
    let mut spec = spec(name, "fixture_misbehave", r#"{"mode":"count"}"#);
    spec.isolation = Isolation::Reused { recycle_after };
    sandbox.load(spec).expect("load")
}

/// The `x-count` a call of `plugin` for `path` answers.
fn count(plugin: &LoadedPlugin, path: &str) -> u64 {
    let decision = plugin.on_request(&get(path)).expect("call").decision;
    header(&decision, "x-count")
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {decision:?}"))
}

#[test]
fn a_reused_instance_keeps_its_globals_until_it_is_recycled() {
    let sandbox = sandbox();
    // The load-time check ran `init` in the first instance and kept it;
    // only phase calls count towards recycling.
    let plugin = reused_counter(&sandbox, "count", 3);
    let counts: Vec<u64> = (0..7).map(|_| count(&plugin, "/")).collect();
    assert_eq!(counts, [1, 2, 3, 1, 2, 3, 1], "replaced after 3 calls");
}

#[test]
fn a_reused_instance_that_traps_is_discarded() {
    let sandbox = sandbox();
    let plugin = reused_counter(&sandbox, "count", 1000);
    assert_eq!(count(&plugin, "/"), 1);
    assert_eq!(count(&plugin, "/"), 2);
    let error = plugin.on_request(&get("/trap")).expect_err("traps");
    assert_eq!(error.kind, FailureKind::Trap, "{error}");
    // The instance that trapped (it had counted to 3) is gone.
    assert_eq!(count(&plugin, "/"), 1);
}

#[test]
fn no_state_crosses_reused_plugins() {
    let sandbox = sandbox();
    // The same component loaded twice: two plugins, two sets of instances.
    let first = reused_counter(&sandbox, "first", 1000);
    let second = reused_counter(&sandbox, "second", 1000);
    let counts: Vec<u64> = (0..3)
        .flat_map(|_| [count(&first, "/"), count(&second, "/")])
        .collect();
    assert_eq!(counts, [1, 1, 2, 2, 3, 3]);
}

#[test]
fn concurrent_calls_never_share_a_reused_instance() {
    let sandbox = sandbox();
    let plugin = Arc::new(reused_counter(&sandbox, "count", 1_000_000));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let plugin = Arc::clone(&plugin);
            std::thread::spawn(move || (0..50).map(|_| count(&plugin, "/")).collect::<Vec<_>>())
        })
        .collect();
    let mut seen: Vec<u64> = Vec::new();
    for thread in threads {
        seen.extend(thread.join().expect("calls"));
    }
    // Each instance answers 1, 2, … m once each, one call at a time. So
    // the instances are the calls that answered 1, and no count is seen
    // more often than the one below it.
    assert_eq!(seen.len(), 200);
    let times = |k: u64| seen.iter().filter(|&&c| c == k).count();
    // Four threads never need more than four instances: one is made only
    // when none is idle.
    assert!((1..=4).contains(&times(1)), "{seen:?}");
    for k in 1..200 {
        assert!(times(k + 1) <= times(k), "{seen:?}");
    }
}

#[test]
fn an_infinite_loop_stops_at_its_deadline_while_others_are_served() {
    let sandbox = Arc::new(sandbox());
    let mut spin = spec("spin", "fixture_misbehave", r#"{"mode":"spin"}"#);
    // The production default: 2 ms.
    spin.limits = Some(Limits::default());
    let spin = sandbox.load(spin).expect("load spin");
    let good = Arc::new(
        sandbox
            .load(spec("good", "template", ""))
            .expect("load template"),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let worker = {
        let (good, stop, served) = (Arc::clone(&good), Arc::clone(&stop), Arc::clone(&served));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                good.on_request(&get("/"))
                    .expect("the good plugin keeps working");
                served.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    for _ in 0..5 {
        let cpu_before = thread_cpu_time();
        let error = spin
            .on_request(&get("/"))
            .expect_err("a loop cannot finish");
        let cpu = thread_cpu_time().saturating_sub(cpu_before);
        eprintln!("the loop was stopped after {cpu:?} of CPU");
        assert_eq!(error.kind, FailureKind::Deadline, "{error}");
        // The deadline is 2 ms of the calling thread's CPU, checked at each
        // 1 ms epoch tick; instantiation adds a little. CPU time, unlike the
        // wall clock, does not grow when the machine is busy.
        assert!(cpu < Duration::from_millis(50), "stopped after {cpu:?}");
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("worker");
    assert!(
        served.load(Ordering::Relaxed) > 0,
        "the good plugin served nothing"
    );
}

#[test]
fn a_memory_bomb_is_stopped_at_the_cap() {
    let sandbox = sandbox();
    let plugin = sandbox
        .load(spec("bomb", "fixture_misbehave", r#"{"mode":"alloc"}"#))
        .expect("load");
    assert_eq!(plugin.limits().memory_bytes, 16 << 20);
    let error = plugin.on_request(&get("/")).expect_err("memory is capped");
    assert_eq!(error.kind, FailureKind::Memory, "{error}");
    // The node goes on: the next call gets a fresh instance and fails the same way.
    let again = plugin.on_request(&get("/")).expect_err("memory is capped");
    assert_eq!(again.kind, FailureKind::Memory);
}

#[test]
fn a_trap_is_a_typed_error_carrying_the_panic_message() {
    let sandbox = sandbox();
    let mut spec = spec("trap", "fixture_misbehave", r#"{"mode":"trap"}"#);
    spec.on_failure = OnFailure::Open;
    let plugin = sandbox.load(spec).expect("load");
    assert_eq!(plugin.on_failure(), OnFailure::Open);
    let error = plugin.on_request(&get("/")).expect_err("it traps");
    assert_eq!(error.kind, FailureKind::Trap, "{error}");
    assert_eq!(error.kind.label(), "trap");
    assert!(error.message.contains("traps on purpose"), "{error}");
}

#[test]
fn an_oversized_answer_is_refused() {
    let sandbox = sandbox();
    let plugin = sandbox
        .load(spec("huge", "fixture_misbehave", r#"{"mode":"huge"}"#))
        .expect("load");
    let error = plugin
        .on_request(&get("/"))
        .expect_err("body over the limit");
    assert_eq!(error.kind, FailureKind::InvalidDecision, "{error}");
}

#[test]
fn an_ok_plugin_continues() {
    let sandbox = sandbox();
    let plugin = sandbox
        .load(spec("ok", "fixture_misbehave", r#"{"mode":"ok"}"#))
        .expect("load");
    assert!(matches!(
        plugin.on_request(&get("/")).expect("call").decision,
        RequestDecision::Continue
    ));
}

/// CPU time the calling thread has used so far.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "the thread's CPU clock is readable");
    Duration::new(
        u64::try_from(now.tv_sec).expect("seconds"),
        u32::try_from(now.tv_nsec).expect("nanoseconds"),
    )
}
