//! The sessions part: four-turn conversations built as the existing controller builds its
//! prompts (every user message so far joined with a newline), each turn sent to a worker with
//! the prefix cache (warm, with the conversation's `sessionId`) and to one without it (cold),
//! alternating which goes first, on the tiny model and on a mid-sized random model of its
//! family. The figures: prompt tokens and, from the warm worker's `done`, those it found in its
//! cache; and the time to the first token of each turn on both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::batching::{Settings, Target, WorkerSystem};
use crate::harness::{Sampling, sampled_request, worker_answer};
use crate::measurement::percentile;
use crate::models::{self, MIDDLE, TINY, describe};

/// Turns of a conversation.
const TURNS: usize = 4;
/// Conversations on each model: each turn's TTFT is the median of this many.
const CONVERSATIONS: usize = 10;
/// Tokens each turn asks for.
const MAX_TOKENS: u32 = 16;
/// Longest a client waits for any one message.
const PATIENCE: Duration = Duration::from_secs(600);

/// What each user message says, in turn; a conversation's first message names it, so no two
/// conversations share more than a few tokens.
const MESSAGES: [&str; TURNS] = [
    "tell me the story of the old mill by the river, the miller who kept it, the children who \
     played in its yard, and how the water wheel turned through every season of the year",
    "what did the miller do in the long winter months, when the river froze over and the wheel \
     stood still, and who came to the mill for flour when the roads were closed by snow",
    "and how did the town change after the railway came through the valley, bringing \
     strangers, new trades and a second mill with a steam engine that never needed the river",
    "now sum up the whole story in a few lines, as the miller's grandchildren would tell it to \
     their own children on a winter evening by the fire",
];

/// A conversation's prompt at turn `k` (1-based), as the controller builds it.
fn prompt(conversation: usize, k: usize) -> String {
    let mut messages: Vec<String> = MESSAGES[..k].iter().map(|m| (*m).to_owned()).collect();
    messages[0] = format!("Conversation {conversation}: {}", messages[0]);
    messages.join("\n")
}

/// The part's figures on each model.
pub(crate) struct Sessions {
    /// How each worker ran.
    pub(crate) settings: Vec<String>,
    pub(crate) tables: Vec<Result<SessionTable, String>>,
}

/// One model's turns.
pub(crate) struct SessionTable {
    pub(crate) model: String,
    pub(crate) about: String,
    pub(crate) conversations: usize,
    pub(crate) rows: Vec<TurnRow>,
    pub(crate) targets: Vec<Target>,
}

/// One turn over every conversation.
pub(crate) struct TurnRow {
    pub(crate) turn: usize,
    /// Mean prompt tokens of the turn.
    pub(crate) prompt_tokens: f64,
    /// Mean prompt tokens the warm worker found in its cache.
    pub(crate) cached_tokens: f64,
    pub(crate) ttft_cold: Duration,
    pub(crate) ttft_warm: Duration,
}

impl TurnRow {
    /// How many times faster the warm first token came.
    pub(crate) fn speedup(&self) -> f64 {
        self.ttft_cold.as_secs_f64() / self.ttft_warm.as_secs_f64().max(1e-9)
    }
}

/// One request's figures.
struct Turn {
    ttft: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// The sessions part on both models; `quick`: one conversation on the tiny model and a model
/// as small, a few tokens a turn.
pub(crate) async fn sessions(url: &str, quick: bool) -> Sessions {
    let not_measured = |why: String| Sessions {
        settings: Vec::new(),
        tables: vec![Err(why)],
    };
    let paths = match models::runtime_paths() {
        Ok(paths) => paths,
        Err(missing) => return not_measured(format!("not measured: {missing}")),
    };
    let middle = if quick {
        &models::LARGER_CHECK
    } else {
        &MIDDLE
    };
    for model in [&TINY, middle] {
        if let Err(why) = model.make().await {
            return not_measured(format!("not measured: {why}"));
        }
    }
    let ids = vec![TINY.id(), middle.id()];
    let warm_settings: Settings = Vec::new();
    let cold_settings: Settings = vec![("runtime.prefixCache", "false".to_owned())];
    let warm = WorkerSystem::start_as(
        url,
        "sessions-warm".to_owned(),
        "worker (prefix cache)",
        warm_settings,
        &paths,
        &ids,
    );
    let (warm, w) = match warm.await {
        Ok(started) => started,
        Err(why) => return not_measured(format!("not measured: {why}")),
    };
    let cold = WorkerSystem::start_as(
        url,
        "sessions-cold".to_owned(),
        "worker (cold)",
        cold_settings,
        &paths,
        &ids,
    );
    let (cold, c) = match cold.await {
        Ok(started) => started,
        Err(why) => {
            warm.stop().await;
            return not_measured(format!("not measured: {why}"));
        }
    };
    let (conversations, max_tokens) = if quick {
        (1, 4)
    } else {
        (CONVERSATIONS, MAX_TOKENS)
    };
    let mut tables = Vec::new();
    for (k, (model, dir)) in [(TINY.id(), TINY.dir()), (middle.id(), middle.dir())]
        .into_iter()
        .enumerate()
    {
        eprintln!("load bench: sessions, {model}");
        let table = measure(&warm, &cold, &model, conversations, max_tokens, k).await;
        tables.push(table.map(|(rows, targets)| SessionTable {
            model,
            about: describe(&dir),
            conversations,
            rows,
            targets,
        }));
    }
    warm.stop().await;
    cold.stop().await;
    Sessions {
        settings: vec![w, c],
        tables,
    }
}

/// Every conversation's turns on both workers, the first of each turn alternating; the rows
/// and the targets. `salt` keeps the models' conversations apart.
async fn measure(
    warm: &WorkerSystem,
    cold: &WorkerSystem,
    model: &str,
    conversations: usize,
    max_tokens: u32,
    salt: usize,
) -> Result<(Vec<TurnRow>, Vec<Target>), String> {
    // A warm-up request on each, of a conversation of its own.
    for (system, tag) in [(warm, "w"), (cold, "c")] {
        send(
            system,
            model,
            &format!("warm-{salt}-{tag}"),
            "Hello",
            None,
            max_tokens,
        )
        .await?;
    }
    let mut warm_turns: BTreeMap<usize, Vec<Turn>> = BTreeMap::new();
    let mut cold_turns: BTreeMap<usize, Vec<Turn>> = BTreeMap::new();
    for n in 0..conversations {
        let conversation = salt * 100 + n;
        let session = format!("conversation-{conversation}");
        for k in 1..=TURNS {
            let text = prompt(conversation, k);
            let (warm_id, cold_id) = (
                format!("s{conversation}-{k}-w"),
                format!("s{conversation}-{k}-c"),
            );
            let warm_run = send(warm, model, &warm_id, &text, Some(&session), max_tokens);
            let cold_run = send(cold, model, &cold_id, &text, None, max_tokens);
            // Which goes first alternates, so neither always finds the machine warmer.
            let (w, c) = if (n + k) % 2 == 0 {
                let w = warm_run.await?;
                (w, cold_run.await?)
            } else {
                let c = cold_run.await?;
                (warm_run.await?, c)
            };
            warm_turns.entry(k).or_default().push(w);
            cold_turns.entry(k).or_default().push(c);
        }
    }
    let rows: Vec<TurnRow> = (1..=TURNS)
        .map(|k| {
            let (w, c) = (&warm_turns[&k], &cold_turns[&k]);
            let mean = |f: &dyn Fn(&Turn) -> u64| {
                w.iter().map(|t| f(t) as f64).sum::<f64>() / w.len().max(1) as f64
            };
            let p50 = |turns: &[Turn]| {
                let mut ttfts: Vec<Duration> = turns.iter().map(|t| t.ttft).collect();
                percentile(&mut ttfts, 50)
            };
            TurnRow {
                turn: k,
                prompt_tokens: mean(&|t| t.prompt_tokens),
                cached_tokens: mean(&|t| t.cached_tokens),
                ttft_cold: p50(c),
                ttft_warm: p50(w),
            }
        })
        .collect();
    let cold_cached: u64 = cold_turns.values().flatten().map(|t| t.cached_tokens).sum();
    if cold_cached > 0 {
        return Err(format!(
            "the worker without a prefix cache said {cold_cached} prompt tokens were cached"
        ));
    }
    let targets = targets(&rows);
    Ok((rows, targets))
}

/// The sessions targets, each a ratio in the same run.
fn targets(rows: &[TurnRow]) -> Vec<Target> {
    let prompt: f64 = rows.iter().map(|r| r.prompt_tokens).sum();
    let cached: f64 = rows.iter().map(|r| r.cached_tokens).sum();
    let avoided = cached / prompt.max(1.0);
    let turn = |k: usize| rows.iter().find(|r| r.turn == k);
    let speedup = |k: usize, bound: f64| match turn(k) {
        Some(row) => (
            row.speedup() >= bound,
            Ok(format!(
                "{:.2}× ({:.1} ms against {:.1} ms)",
                row.speedup(),
                row.ttft_warm.as_secs_f64() * 1e3,
                row.ttft_cold.as_secs_f64() * 1e3
            )),
        ),
        None => (false, Err(format!("no turn {k}"))),
    };
    let (fourth_met, fourth) = speedup(TURNS, 3.0);
    let (first_met, first) = speedup(1, 0.95);
    vec![
        Target {
            what: "4 turns: ≥ 60% of prefill tokens avoided",
            met: avoided >= 0.6,
            figure: Ok(format!(
                "{:.0}% ({cached:.0} of {prompt:.0} prompt tokens a conversation)",
                avoided * 100.0
            )),
        },
        Target {
            what: "turn 4: TTFT ≥ 3× faster than cold",
            met: fourth_met,
            figure: fourth,
        },
        Target {
            what: "turn 1: TTFT no slower than cold (≥ 0.95×)",
            met: first_met,
            figure: first,
        },
    ]
}

/// One greedy request to `system`, its figures: request sent → first token, and the prompt
/// figures of its `done`.
async fn send(
    system: &WorkerSystem,
    model: &str,
    id: &str,
    prompt: &str,
    session: Option<&str>,
    max_tokens: u32,
) -> Result<Turn, String> {
    let mut request = sampled_request(id, model, prompt, max_tokens, Sampling::GREEDY);
    request.session_id = session.map(str::to_owned);
    let answer = worker_answer(&system.client, &system.id, &request, PATIENCE).await?;
    let first = answer
        .arrivals
        .first()
        .copied()
        .unwrap_or_else(Instant::now);
    Ok(Turn {
        ttft: first - answer.sent,
        prompt_tokens: answer.prompt_tokens.unwrap_or(0),
        cached_tokens: answer.cached_tokens.unwrap_or(0),
    })
}

/// Checks what the part judges with, on made-up turns whose answers are known.
pub(crate) fn check_sessions_logic() {
    let row = |turn, prompt_tokens, cached_tokens, cold_ms, warm_ms| TurnRow {
        turn,
        prompt_tokens,
        cached_tokens,
        ttft_cold: Duration::from_millis(cold_ms),
        ttft_warm: Duration::from_millis(warm_ms),
    };
    // 300 of 500 prompt tokens cached: exactly 60%; turn 4 exactly 3×; turn 1 at 0.95×.
    let rows = [
        row(1, 50.0, 0.0, 95, 100),
        row(2, 100.0, 49.0, 20, 10),
        row(3, 150.0, 99.0, 30, 10),
        row(4, 200.0, 152.0, 30, 10),
    ];
    let met: Vec<bool> = targets(&rows).iter().map(|t| t.met).collect();
    assert_eq!(met, [true, true, true]);
    let rows = [
        row(1, 50.0, 0.0, 94, 100),
        row(2, 100.0, 49.0, 20, 10),
        row(3, 150.0, 99.0, 30, 10),
        row(4, 200.0, 151.0, 29, 10),
    ];
    let met: Vec<bool> = targets(&rows).iter().map(|t| t.met).collect();
    assert_eq!(met, [false, false, false]);
    assert!(!targets(&rows[..3])[1].met, "without turn 4, missed");
    // The controller's prompts: each turn extends the last by a newline and a message.
    assert!(prompt(3, 2).starts_with(&format!("{}\n", prompt(3, 1))));
}
