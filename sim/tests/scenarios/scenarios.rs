//! The scenarios, each run on its pinned seed (or `SIM_SEED`) with every invariant checked.

use mlx_worker_sim::invariants::check_flood;
use mlx_worker_sim::world::{Command, MODEL, request};
use mlx_worker_sim::{
    Batching, EventKind, Fault, FaultKind, SimEngineConfig, Skew, Violation, World,
};

use crate::harness::{Scenario, check_clean, expect, ms, terminal, tokens};

type Run = Result<Vec<Violation>, String>;

fn ready(w: &mut World) -> Result<(), String> {
    w.run_until_lifecycle("ready", ms(3000))
}

/// Cut the worker's link while it streams: both ends notice by pings, the worker reconnects,
/// re-registers before it is ready again, and the stream still ends with one terminal that
/// reaches the controller once the link is back.
fn partition_during_streaming_script(w: &mut World) -> Run {
    ready(w)?;
    w.subscribe_response("p1");
    w.send_request("p1", 80);
    w.run_for(ms(300))?;
    w.partition();
    w.run_for(ms(900))?;
    w.repair();
    w.run_for(ms(1500))?;
    w.run_until_lifecycle("ready", ms(2000))?;
    w.subscribe_response("p2");
    w.send_request("p2", 3);
    w.run_for(ms(1500))?;
    let reconnected = w.trace.events().iter().any(|e| {
        e.node == "worker"
            && matches!(e.kind, EventKind::Connected { reconnects } if reconnects > 0)
    });
    Ok([
        expect(reconnected, "the worker reconnected"),
        expect(
            terminal(w, "p1").is_some(),
            "p1's terminal reached the controller",
        ),
        expect(
            terminal(w, "p2").as_deref() == Some("done"),
            "p2 completed after the heal",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Crash the broker mid-stream and restart it empty: the worker reconnects, resubscribes and
/// registers again on the new broker, and serves the next request.
fn broker_crash_and_restart_script(w: &mut World) -> Run {
    ready(w)?;
    w.subscribe_response("b1");
    w.send_request("b1", 40);
    w.run_for(ms(300))?;
    w.crash_broker();
    let crashed_at = w.elapsed();
    w.run_for(ms(500))?;
    w.restart_broker();
    w.run_for(ms(1500))?;
    w.run_until_lifecycle("ready", ms(2000))?;
    w.subscribe_response("b2");
    w.send_request("b2", 3);
    w.run_for(ms(1500))?;
    let registered_again = w.trace.events().iter().any(|e| {
        e.at > crashed_at
            && matches!(&e.kind, EventKind::BrokerGot { from, subject, .. }
                if from == "worker" && subject == "worker.register")
    });
    Ok([
        expect(registered_again, "the restarted broker saw worker.register"),
        expect(
            terminal(w, "b2").as_deref() == Some("done"),
            "b2 completed on the new broker",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Stop the worker with one request running and two waiting: the drain lets all three finish
/// within `drainTimeoutMs`, then the worker deregisters and stops; a request arriving during
/// the drain is refused with `WORKER_SHUTDOWN`.
fn drain_with_running_and_queued_script(w: &mut World) -> Run {
    ready(w)?;
    for (id, n) in [("d0", 20), ("d1", 10), ("d2", 10)] {
        w.subscribe_response(id);
        w.send_request(id, n);
    }
    w.run_for(ms(100))?;
    w.stop_worker();
    w.run_for(ms(50))?;
    w.subscribe_response("late");
    w.send_request("late", 3);
    w.run_for(ms(8000))?;
    let deregistered = w.trace.events().iter().any(|e| {
        matches!(&e.kind, EventKind::BrokerGot { subject, .. } if subject == "worker.deregister")
    });
    Ok([
        expect(
            terminal(w, "d0").as_deref() == Some("done"),
            "d0 finished in the drain",
        ),
        expect(
            terminal(w, "d1").as_deref() == Some("done"),
            "d1 finished in the drain",
        ),
        expect(
            terminal(w, "d2").as_deref() == Some("done"),
            "d2 finished in the drain",
        ),
        expect(
            terminal(w, "late").as_deref() == Some("WORKER_SHUTDOWN"),
            "a request during the drain is refused",
        ),
        expect(deregistered, "worker.deregister was published"),
        expect(
            w.lifecycle().as_deref() == Some("stopped"),
            "the worker stopped",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The engine stops producing tokens: the request ends `TIMEOUT` at its deadline.
fn engine_hang_script(w: &mut World) -> Run {
    ready(w)?;
    w.engine_fault(Fault::HangAfter(2));
    w.subscribe_response("h1");
    let mut body = request("h1", 20);
    body["timeoutMs"] = serde_json::json!(400);
    w.send_json(&body);
    w.run_for(ms(2500))?;
    Ok(expect(
        terminal(w, "h1").as_deref() == Some("TIMEOUT"),
        "h1 timed out",
    )
    .into_iter()
    .collect())
}

/// The engine crashes mid-stream, then a generation fails mid-stream, then a load fails: each
/// request ends with one error; the model whose load failed is withdrawn (refused at once)
/// until the rescan retries it, and the worker serves it again afterwards.
fn engine_crash_mid_stream_script(w: &mut World) -> Run {
    ready(w)?;
    w.engine_fault(Fault::CrashAfter {
        tokens: 3,
        restart: ms(200),
    });
    w.subscribe_response("c1");
    w.send_request("c1", 10);
    w.run_for(ms(800))?;
    w.engine_fault(Fault::FailAfter(2));
    w.subscribe_response("c2");
    w.send_request("c2", 10);
    w.run_for(ms(500))?;
    // The crash unloaded the model, and c2 reloaded it; unload so the next load can fail.
    w.engine_fault(Fault::LoadFails);
    {
        use mlx_worker::engine::Engine as _;
        let engine = w.engine.clone();
        futures::executor::block_on(engine.unload(mlx_worker_sim::world::MODEL))
            .map_err(|e| e.to_string())?;
    }
    w.subscribe_response("c3");
    w.send_request("c3", 3);
    w.run_for(ms(500))?;
    // The model is withdrawn: refused at once, without a load, until the rescan retries it
    // (its first retry is due 30 s after the failure; the rescan runs every 60 s).
    w.subscribe_response("c4");
    w.send_request("c4", 3);
    w.run_for(ms(800))?;
    w.run_for(ms(60_000))?;
    w.subscribe_response("c5");
    w.send_request("c5", 3);
    w.run_for(ms(800))?;
    Ok([
        expect(
            terminal(w, "c1").as_deref() == Some("ENGINE_CRASHED"),
            format!("c1 ended {:?}", terminal(w, "c1")),
        ),
        expect(
            terminal(w, "c2").as_deref() == Some("ENGINE_ERROR"),
            format!("c2 ended {:?}", terminal(w, "c2")),
        ),
        expect(
            terminal(w, "c3").as_deref() == Some("MODEL_LOAD_FAILED"),
            format!("c3 ended {:?}", terminal(w, "c3")),
        ),
        expect(
            terminal(w, "c4").as_deref() == Some("MODEL_LOAD_FAILED"),
            format!("c4 (the model withdrawn) ended {:?}", terminal(w, "c4")),
        ),
        expect(
            terminal(w, "c5").as_deref() == Some("done"),
            "c5 completed once the rescan's retry loaded the model",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The controller publishes first and subscribes 60 ms later, as the existing one does: it
/// still gets every token from index 0.
fn late_subscriber_script(w: &mut World) -> Run {
    ready(w)?;
    w.fault(FaultKind::LateSubscriber);
    w.send_request("l1", 5);
    w.run_for(ms(60))?;
    w.subscribe_response("l1");
    w.run_for(ms(800))?;
    Ok([
        expect(
            tokens(w, "l1") == 5,
            format!("l1 got {} of 5 tokens", tokens(w, "l1")),
        ),
        expect(terminal(w, "l1").as_deref() == Some("done"), "l1 completed"),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// A request id sent again while the first is in flight: the copy is refused on its reply
/// subject only, and the first stream is untouched.
fn duplicate_request_ids_script(w: &mut World) -> Run {
    ready(w)?;
    w.subscribe_response("dup");
    w.send_request("dup", 15);
    w.run_for(ms(100))?;
    w.fault(FaultKind::Duplicate);
    let subject = format!("worker.{}.inference", mlx_worker_sim::world::WORKER_ID);
    w.command(Command::PublishWithReply(
        subject,
        "reply.dup".to_owned(),
        bytes::Bytes::from(request("dup", 15).to_string()),
    ));
    w.run_for(ms(800))?;
    let refused = w.trace.events().iter().any(|e| {
        e.node == "controller"
            && matches!(&e.kind, EventKind::Received { subject, payload }
                if subject == "reply.dup"
                    && String::from_utf8_lossy(payload).contains("DUPLICATE_REQUEST"))
    });
    Ok([
        expect(
            refused,
            "the copy was refused with DUPLICATE_REQUEST on its reply subject",
        ),
        expect(
            tokens(w, "dup") == 15,
            format!("dup got {} of 15 tokens", tokens(w, "dup")),
        ),
        expect(
            terminal(w, "dup").as_deref() == Some("done"),
            "dup completed once",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Eight requests at once for one slot and a queue of two: the surplus is refused with
/// `QUEUE_FULL`, no heartbeat reports more than two waiting, the rest complete.
fn flood_past_queue_bound_script(w: &mut World) -> Run {
    ready(w)?;
    w.fault(FaultKind::Flood);
    let ids: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    for id in &ids {
        w.subscribe_response(id);
    }
    w.run_for(ms(20))?;
    for id in &ids {
        w.send_request(id, 10);
    }
    w.run_for(ms(2000))?;
    let mut out: Vec<Violation> = check_flood(&w.trace.events(), &ids, 3)
        .into_iter()
        .collect();
    out.extend(expect(
        ids.iter().all(|id| terminal(w, id).is_some()),
        "every flooded request ended",
    ));
    Ok(out)
}

/// A cancel that arrives before its request is honoured when the request comes; a cancel
/// after the first token stops the stream with `CANCELLED`.
fn cancel_before_and_after_first_token_script(w: &mut World) -> Run {
    ready(w)?;
    w.subscribe_response("x1");
    w.send_cancel("x1");
    w.run_for(ms(50))?;
    w.send_request("x1", 5);
    w.run_for(ms(500))?;
    w.subscribe_response("x2");
    w.send_request("x2", 50);
    w.run_for(ms(200))?;
    w.send_cancel("x2");
    w.run_for(ms(500))?;
    Ok([
        expect(
            terminal(w, "x1").as_deref() == Some("CANCELLED"),
            format!("x1 ended {:?}", terminal(w, "x1")),
        ),
        expect(
            terminal(w, "x2").as_deref() == Some("CANCELLED"),
            format!("x2 ended {:?}", terminal(w, "x2")),
        ),
        expect(
            tokens(w, "x2") > 0 && tokens(w, "x2") < 50,
            "x2 was stopped mid-stream",
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The worker's wall clock is 5 s behind and drifts, then steps forward 3 s: heartbeats keep
/// their monotonic rhythm and requests are unaffected.
fn heartbeats_under_clock_skew_script(w: &mut World) -> Run {
    w.skew_clock(Skew {
        offset_ms: -5000,
        drift_ppm: 20_000,
    });
    ready(w)?;
    let from = w.elapsed();
    w.run_for(ms(1000))?;
    w.step_clock(3000);
    w.subscribe_response("s1");
    w.send_request("s1", 5);
    w.run_for(ms(1000))?;
    let beats = w
        .trace
        .events()
        .iter()
        .filter(|e| {
            e.at >= from
                && matches!(&e.kind, EventKind::BrokerGot { subject, .. } if subject == "worker.heartbeat")
        })
        .count();
    Ok([
        expect(
            (9..=12).contains(&beats),
            format!("{beats} heartbeats in 2 s at a 200 ms interval"),
        ),
        expect(terminal(w, "s1").as_deref() == Some("done"), "s1 completed"),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// The controller reads its link slower than the worker writes: messages back up at the
/// broker, the worker is not held back, and the controller still gets the whole stream in order.
fn slow_consumer_script(w: &mut World) -> Run {
    ready(w)?;
    w.fault(FaultKind::SlowConsumer);
    w.command(Command::ReadDelay(ms(24)));
    w.subscribe_response("sc");
    w.send_request("sc", 30);
    w.run_for(ms(2000))?;
    w.command(Command::ReadDelay(ms(0)));
    w.run_for(ms(200))?;
    Ok([
        expect(
            tokens(w, "sc") == 30,
            format!("sc got {} of 30 tokens", tokens(w, "sc")),
        ),
        expect(terminal(w, "sc").as_deref() == Some("done"), "sc completed"),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// A model the engine runs only [`NARROW_STREAMS`] of at once.
const NARROW: &str = "sim/narrow";
/// Generations of [`NARROW`] the engine holds at once; it refuses the next, as the MLX runtime
/// does past its limit.
const NARROW_STREAMS: usize = 3;

/// The world's engine, also serving [`NARROW`].
fn narrow_engine(engine: &mut SimEngineConfig) {
    engine.models.insert(NARROW.to_owned(), 1_000_000);
    engine.streams_max.insert(NARROW.to_owned(), NARROW_STREAMS);
}

/// Nine requests at once for a model the engine runs three of, on a worker allowed twelve at
/// once (overall and for the tier), with two requests for the world's model beside them: the
/// surplus waits in the worker's queue while the other model's requests start at once; every
/// request ends `done` with all its tokens, the engine holds three of the narrow model at once
/// and never more, and refuses nothing (`engine-capacity`).
fn burst_past_engine_capacity_script(w: &mut World) -> Run {
    ready(w)?;
    let narrow: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
    let wide = ["w0", "w1"];
    for id in narrow.iter().map(String::as_str).chain(wide) {
        w.subscribe_response(id);
    }
    w.run_for(ms(20))?;
    for id in &narrow {
        let mut body = request(id, 10);
        body["modelId"] = serde_json::json!(NARROW);
        w.send_json(&body);
    }
    for id in wide {
        w.send_request(id, 10);
    }
    w.run_for(ms(2500))?;
    let burst: Vec<&str> = narrow.iter().map(String::as_str).collect();
    Ok(burst_outcome(w, &burst, NARROW, NARROW_STREAMS, &wide))
}

/// What a burst of requests of `model` (`burst`) beside requests of the world's model
/// (`wide`) must end with: every one `done` with its 10 tokens, the engine holding
/// `model_peak` of `model` at once and all of `wide`.
fn burst_outcome(
    w: &World,
    burst: &[&str],
    model: &str,
    model_peak: usize,
    wide: &[&str],
) -> Vec<Violation> {
    let mut out: Vec<Violation> = burst
        .iter()
        .chain(wide)
        .filter_map(|id| {
            expect(
                terminal(w, id).as_deref() == Some("done") && tokens(w, id) == 10,
                format!(
                    "{id} ended {:?} after {} tokens",
                    terminal(w, id),
                    tokens(w, id)
                ),
            )
        })
        .collect();
    let peak = w.engine.live_peak(model);
    out.extend(expect(
        peak == model_peak,
        format!("the engine held {peak} of {model} at once, not {model_peak}"),
    ));
    let beside = w.engine.live_peak(MODEL);
    out.extend(expect(
        beside == wide.len(),
        format!(
            "{beside} of {MODEL} ran at once beside the burst, not {}",
            wide.len()
        ),
    ));
    out
}

/// A model the engine's catalog says it runs [`UNBATCHED_PLANNED`] of at once, whose load
/// answers one (as the MLX runtime answers for a model whose cache cannot be batched).
const UNBATCHED: &str = "sim/unbatched";
/// What the catalog says of [`UNBATCHED`].
const UNBATCHED_PLANNED: usize = 4;

/// The world's engine, also serving [`UNBATCHED`].
fn unbatched_engine(engine: &mut SimEngineConfig) {
    engine.models.insert(UNBATCHED.to_owned(), 1_000_000);
    engine
        .streams_max
        .insert(UNBATCHED.to_owned(), UNBATCHED_PLANNED);
    engine.loaded_streams_max.insert(UNBATCHED.to_owned(), 1);
}

/// A model planned at four at once whose load answers one: once a first request has loaded
/// it, a burst of five of its requests (with two of the world's model beside them) on a worker
/// allowed twelve at once runs one at a time, the rest waiting in the worker's queue; every
/// request ends `done` with all its tokens, the engine holds one of the model at once, and
/// refuses nothing (`engine-capacity`).
fn load_answers_fewer_streams_script(w: &mut World) -> Run {
    ready(w)?;
    let burst: Vec<String> = (1..=5).map(|i| format!("u{i}")).collect();
    let wide = ["w0", "w1"];
    let first = std::iter::once("u0".to_owned());
    for id in first.chain(burst.iter().cloned()) {
        w.subscribe_response(&id);
    }
    for id in wide {
        w.subscribe_response(id);
    }
    w.run_for(ms(20))?;
    let unbatched = |id: &str| {
        let mut body = request(id, 10);
        body["modelId"] = serde_json::json!(UNBATCHED);
        body
    };
    w.send_json(&unbatched("u0"));
    w.run_for(ms(800))?;
    let mut out: Vec<Violation> = expect(
        terminal(w, "u0").as_deref() == Some("done"),
        format!("the first request ended {:?}", terminal(w, "u0")),
    )
    .into_iter()
    .collect();
    for id in &burst {
        w.send_json(&unbatched(id));
    }
    for id in wide {
        w.send_request(id, 10);
    }
    w.run_for(ms(3000))?;
    let burst: Vec<&str> = burst.iter().map(String::as_str).collect();
    out.extend(burst_outcome(w, &burst, UNBATCHED, 1, &wide));
    Ok(out)
}

/// A model the engine runs in batches of [`BATCH_CAPACITY`].
const BATCHED: &str = "sim/batched";
/// Generations of [`BATCHED`] one step runs; the worker may hand the engine more (it runs
/// eight at once), which wait inside the engine.
const BATCH_CAPACITY: usize = 3;

/// The world's engine, also serving [`BATCHED`] in batches, a step every 10 ms, with token
/// channels of two events, so that a stream whose consumer waits gets its tokens together.
fn batched_engine(engine: &mut SimEngineConfig) {
    engine.models.insert(BATCHED.to_owned(), 1_000_000);
    engine.batches.insert(
        BATCHED.to_owned(),
        Batching {
            capacity: BATCH_CAPACITY,
            step_latency: ms(10),
        },
    );
    engine.token_channel_capacity = 2;
}

/// Eight requests at once for a batched model that runs three per step, on a worker that runs
/// eight: five wait inside the engine in arrival order; the controller subscribes 200 ms late,
/// so the first streams' first tokens wait for their listener while the batch steps on and
/// their next tokens reach the worker together. One waiting request is cancelled, and one
/// more, sent once the worker is full, fails mid-stream: every request ends with its one
/// terminal, the others `done` with all their tokens, the batch runs three at once and
/// the engine refuses nothing (`engine-capacity`).
fn batched_engine_narrower_than_the_worker_script(w: &mut World) -> Run {
    ready(w)?;
    let ids: Vec<String> = (0..8).map(|i| format!("q{i}")).collect();
    w.fault(FaultKind::LateSubscriber);
    for id in &ids {
        let mut body = request(id, 12);
        body["modelId"] = serde_json::json!(BATCHED);
        w.send_json(&body);
    }
    w.run_for(ms(200))?;
    for id in ids.iter().map(String::as_str).chain(["qf"]) {
        w.subscribe_response(id);
    }
    w.send_cancel("q7");
    w.engine_fault(Fault::FailAfter(3));
    let mut failing = request("qf", 12);
    failing["modelId"] = serde_json::json!(BATCHED);
    w.send_json(&failing);
    w.run_for(ms(2500))?;
    let mut out: Vec<Violation> = ids[..7]
        .iter()
        .filter_map(|id| {
            expect(
                terminal(w, id).as_deref() == Some("done") && tokens(w, id) == 12,
                format!(
                    "{id} ended {:?} after {} tokens",
                    terminal(w, id),
                    tokens(w, id)
                ),
            )
        })
        .collect();
    out.extend(expect(
        terminal(w, "q7").as_deref() == Some("CANCELLED"),
        format!("q7 ended {:?}", terminal(w, "q7")),
    ));
    out.extend(expect(
        terminal(w, "qf").as_deref() == Some("ENGINE_ERROR") && tokens(w, "qf") == 3,
        format!(
            "qf ended {:?} after {} tokens",
            terminal(w, "qf"),
            tokens(w, "qf")
        ),
    ));
    let (running, queued) = (w.engine.batch_peak(BATCHED), w.engine.queued_peak(BATCHED));
    out.extend(expect(
        running == BATCH_CAPACITY && queued > 0,
        format!(
            "the batch ran {running} at once (capacity {BATCH_CAPACITY}), {queued} waited in the engine"
        ),
    ));
    Ok(out)
}

/// The controller restarts and knows no worker; it drops heartbeats from unknown ids, so only a
/// `worker.register` makes the worker routable again. A controller that subscribes at any
/// moment must hear one within a heartbeat interval (plus the network's latency both ways):
/// from the moment it subscribes, and between any two it receives after that.
fn restarted_controller_hears_a_registration_within_an_interval_script(w: &mut World) -> Run {
    ready(w)?;
    let interval = w.node.heartbeat_interval;
    // Well into the periodic phase, between two of the heartbeats.
    w.run_for(interval * 13 + interval / 4)?;
    let subscribed_at = w.elapsed();
    w.command(Command::Subscribe("worker.register".to_owned()));
    w.run_for(interval * 10)?;
    let heard: Vec<std::time::Duration> = w
        .trace
        .events()
        .iter()
        .filter(|e| {
            e.node == "controller"
                && matches!(&e.kind, EventKind::Received { subject, .. } if subject == "worker.register")
        })
        .map(|e| e.at)
        .collect();
    // Each way a message takes at most the world's latency bound (12 ms), plus a tick.
    let bound = interval + ms(2 * 13);
    let first = heard.first().map(|at| *at - subscribed_at);
    let longest_gap = heard.windows(2).map(|p| p[1] - p[0]).max();
    Ok([
        expect(
            first.is_some_and(|d| d <= bound),
            format!("first registration {first:?} after subscribing, bound {bound:?}"),
        ),
        expect(
            heard.len() >= 9 && longest_gap.is_some_and(|d| d <= bound),
            format!(
                "{} registrations in 10 intervals, longest gap {longest_gap:?}, bound {bound:?}",
                heard.len()
            ),
        ),
    ]
    .into_iter()
    .flatten()
    .collect())
}

/// Every scenario, with its pinned seed.
pub(crate) const ALL: &[(Scenario, u64)] = &[
    (
        Scenario {
            name: "partition_during_streaming",
            yaml: "",
            engine: None,
            run: partition_during_streaming_script,
        },
        1,
    ),
    (
        Scenario {
            name: "broker_crash_and_restart",
            yaml: "",
            engine: None,
            run: broker_crash_and_restart_script,
        },
        2,
    ),
    (
        Scenario {
            name: "drain_with_running_and_queued",
            yaml: "  maxConcurrent: 1\n  drainTimeoutMs: 3000\n",
            engine: None,
            run: drain_with_running_and_queued_script,
        },
        3,
    ),
    (
        Scenario {
            name: "engine_hang",
            yaml: "",
            engine: None,
            run: engine_hang_script,
        },
        4,
    ),
    (
        Scenario {
            name: "engine_crash_mid_stream",
            yaml: "",
            engine: None,
            run: engine_crash_mid_stream_script,
        },
        5,
    ),
    (
        Scenario {
            name: "late_subscriber",
            yaml: "",
            engine: None,
            run: late_subscriber_script,
        },
        6,
    ),
    (
        Scenario {
            name: "duplicate_request_ids",
            yaml: "",
            engine: None,
            run: duplicate_request_ids_script,
        },
        7,
    ),
    (
        Scenario {
            name: "flood_past_queue_bound",
            yaml: "  maxConcurrent: 1\n  requestQueue:\n    maxDepth: 2\n",
            engine: None,
            run: flood_past_queue_bound_script,
        },
        8,
    ),
    (
        Scenario {
            name: "cancel_before_and_after_first_token",
            yaml: "",
            engine: None,
            run: cancel_before_and_after_first_token_script,
        },
        9,
    ),
    (
        Scenario {
            name: "heartbeats_under_clock_skew",
            yaml: "",
            engine: None,
            run: heartbeats_under_clock_skew_script,
        },
        10,
    ),
    (
        Scenario {
            name: "slow_consumer",
            yaml: "",
            engine: None,
            run: slow_consumer_script,
        },
        11,
    ),
    (
        Scenario {
            name: "burst_past_engine_capacity",
            yaml: "  maxConcurrent: 12\n  tierLimits:\n    \"<3B\":\n      maxConcurrent: 12\n      queueDepth: 20\n",
            engine: Some(narrow_engine),
            run: burst_past_engine_capacity_script,
        },
        14,
    ),
    (
        Scenario {
            name: "batched_engine_narrower_than_the_worker",
            yaml: "  maxConcurrent: 8\n  tierLimits:\n    \"<3B\":\n      maxConcurrent: 8\n      queueDepth: 20\n",
            engine: Some(batched_engine),
            run: batched_engine_narrower_than_the_worker_script,
        },
        16,
    ),
    (
        Scenario {
            name: "load_answers_fewer_streams",
            yaml: "  maxConcurrent: 12\n  tierLimits:\n    \"<3B\":\n      maxConcurrent: 12\n      queueDepth: 20\n",
            engine: Some(unbatched_engine),
            run: load_answers_fewer_streams_script,
        },
        16,
    ),
    (
        Scenario {
            name: "restarted_controller_hears_a_registration_within_an_interval",
            yaml: "",
            engine: None,
            run: restarted_controller_hears_a_registration_within_an_interval_script,
        },
        15,
    ),
];

/// The scenario called `name`.
pub(crate) fn named(name: &str) -> &'static (Scenario, u64) {
    ALL.iter()
        .chain(crate::delivery::ALL)
        .find(|(s, _)| s.name == name)
        .expect("scenario exists")
}

macro_rules! scenario_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let (scenario, seed) = named(stringify!($name));
            check_clean(scenario, *seed);
        }
    )*};
}

scenario_tests!(
    partition_during_streaming,
    broker_crash_and_restart,
    drain_with_running_and_queued,
    engine_hang,
    engine_crash_mid_stream,
    late_subscriber,
    duplicate_request_ids,
    flood_past_queue_bound,
    cancel_before_and_after_first_token,
    heartbeats_under_clock_skew,
    slow_consumer,
    burst_past_engine_capacity,
    batched_engine_narrower_than_the_worker,
    load_answers_fewer_streams,
    restarted_controller_hears_a_registration_within_an_interval,
);
