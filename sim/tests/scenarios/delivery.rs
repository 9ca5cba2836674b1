//! Scenarios of delivery between the worker and its clients: a broker outage far longer than
//! the listener check's timeout, with running and waiting requests, and a client that
//! subscribes late while a tap listens on `response.>`.

use mlx_worker::protocol::StreamMessage;
use mlx_worker_sim::invariants::received_stream;
use mlx_worker_sim::world::{Command, request};
use mlx_worker_sim::{Violation, World};

use crate::harness::{Scenario, expect, ms, terminal};

type Run = Result<Vec<Violation>, String>;

/// Terminal messages the controller received for `id`.
fn terminals(w: &World, id: &str) -> usize {
    received_stream(&w.trace.events(), id)
        .iter()
        .filter(|m| m.is_terminal())
        .count()
}

/// The broker dies for 20 s while two requests stream and four wait. `a0`'s deadline passes
/// during the outage (nobody is left to tell: it is counted undeliverable), and so does
/// waiting `qx`'s; `q0` starts during the outage, when `a0`'s slot frees, so its first
/// message waits for the link. Once the broker is back, `a1` — which lost tokens with the
/// link — ends `STREAM_INTERRUPTED`, and `q0`, `q1`, `q2` run to `done`: each with exactly
/// one terminal, none of them papering over a gap.
fn long_broker_outage_script(w: &mut World) -> Run {
    w.run_until_lifecycle("ready", ms(3000))?;
    let all = ["a0", "a1", "q0", "q1", "q2", "qx"];
    for id in all {
        w.subscribe_response(id);
    }
    w.run_for(ms(20))?;
    let mut a0 = request("a0", 400);
    a0["timeoutMs"] = serde_json::json!(4000);
    w.send_json(&a0);
    w.send_request("a1", 400);
    for id in ["q0", "q1", "q2"] {
        w.send_request(id, 10);
    }
    let mut qx = request("qx", 10);
    qx["timeoutMs"] = serde_json::json!(5000);
    w.send_json(&qx);
    w.run_for(ms(300))?;
    w.crash_broker();
    w.run_for(ms(20_000))?;
    w.restart_broker();
    // Past every deadline plus slack, so the invariants judge every request.
    w.run_for(ms(12_000))?;
    w.stop_worker();
    w.run_until_lifecycle("stopped", ms(5000))?;
    let report = w.reports().pop().ok_or("the worker did not report")?;
    let m = &report.dispatch.metrics;
    let mut out: Vec<Violation> = [
        expect(
            terminal(w, "a1").as_deref() == Some("STREAM_INTERRUPTED"),
            format!("a1 ended {:?}", terminal(w, "a1")),
        ),
        expect(
            terminal(w, "a0").is_none() && terminal(w, "qx").is_none(),
            "nothing reached the controller for a0 and qx, whose deadlines passed in the outage",
        ),
        expect(
            m.undeliverable == 1,
            format!("{} undeliverable, expected a0's", m.undeliverable),
        ),
        expect(
            report.dispatch.abandoned == 0,
            format!("{} abandoned", report.dispatch.abandoned),
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    for id in ["q0", "q1", "q2"] {
        out.extend(expect(
            terminal(w, id).as_deref() == Some("done"),
            format!("{id} ended {:?}", terminal(w, id)),
        ));
    }
    for id in ["a1", "q0", "q1", "q2"] {
        out.extend(expect(
            terminals(w, id) == 1,
            format!(
                "{id}: {} terminals reached the controller",
                terminals(w, id)
            ),
        ));
    }
    Ok(out)
}

/// With the model loaded, a tap listens on `response.>` while the controller sends a request
/// and subscribes to its response subject 60 ms later. The tap makes the listener check pass at once, so only
/// `lateSubscriberMinDelayMs` (150 ms here) protects the late subscriber: it still gets every
/// message, so each one reaches the controller twice, through the tap and through the late
/// subscription.
fn late_subscriber_behind_a_tap_script(w: &mut World) -> Run {
    w.run_until_lifecycle("ready", ms(3000))?;
    // Load the model first, so the first token follows the request within milliseconds.
    w.subscribe_response("warm");
    w.send_request("warm", 1);
    w.run_for(ms(300))?;
    w.command(Command::Subscribe("response.>".to_owned()));
    w.run_for(ms(20))?;
    w.fault(mlx_worker_sim::FaultKind::LateSubscriber);
    w.send_request("t1", 5);
    w.run_for(ms(60))?;
    w.subscribe_response("t1");
    w.run_for(ms(800))?;
    let stream = received_stream(&w.trace.events(), "t1");
    let firsts = stream
        .iter()
        .filter(|m| matches!(m, StreamMessage::Token { index: 0, .. }))
        .count();
    Ok([
        expect(
            firsts == 2,
            format!("token 0 reached the controller {firsts} times, expected 2 (tap and late subscriber)"),
        ),
        expect(
            stream.len() == 12,
            format!("{} messages reached the controller, expected 6 twice", stream.len()),
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The scenarios of this module, with their pinned seeds.
pub(crate) const ALL: &[(Scenario, u64)] = &[
    (
        Scenario {
            name: "long_broker_outage",
            yaml: "  maxConcurrent: 2\n  requestTimeoutMs: 30000\n",
            engine: None,
            run: long_broker_outage_script,
        },
        12,
    ),
    (
        Scenario {
            name: "late_subscriber_behind_a_tap",
            yaml: "  lateSubscriberMinDelayMs: 150\n",
            engine: None,
            run: late_subscriber_behind_a_tap_script,
        },
        13,
    ),
];

#[test]
fn long_broker_outage() {
    let (scenario, seed) = &ALL[0];
    crate::harness::check_clean(scenario, *seed);
}

#[test]
fn late_subscriber_behind_a_tap() {
    let (scenario, seed) = &ALL[1];
    crate::harness::check_clean(scenario, *seed);
}
