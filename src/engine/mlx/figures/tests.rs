// Goal: the per-model figures add up what each completed stream's stats say, in both runtimes'
// shapes, keep growing across loads and runtime ends, and show a model no longer loaded with a
// batch size of 0.
// Method: a book fed loads, stats and ends by hand, read back whole.

use super::*;

fn stats(prompt_tokens: u64, prompt_time: f64, tokens: u64, total_time: f64) -> StreamStats {
    StreamStats {
        prompt_tokens: Some(prompt_tokens),
        prompt_time: Some(prompt_time),
        queue_time: Some(0.5),
        tokens_generated: Some(tokens),
        time_to_first_token: Some(prompt_time + 0.25),
        total_time: Some(total_time),
        cached_tokens: None,
    }
}

#[test]
fn completed_streams_add_up_per_model() {
    let book = FigureBook::default();
    book.loaded("a", 8);
    book.completed("a", &stats(5, 0.5, 10, 2.0));
    book.completed("a", &stats(7, 0.25, 4, 1.25));
    book.completed("b", &stats(1, 0.125, 2, 0.5));
    assert_eq!(
        book.snapshot(),
        BTreeMap::from([
            (
                "a".to_owned(),
                ModelFigures {
                    batch_size: 8,
                    prompt_tokens: 12,
                    prompt_seconds: 0.75,
                    generated_tokens: 14,
                    decode_seconds: 2.5,
                    streams_completed: 2,
                    ..ModelFigures::default()
                }
            ),
            (
                "b".to_owned(),
                ModelFigures {
                    batch_size: 0,
                    prompt_tokens: 1,
                    prompt_seconds: 0.125,
                    generated_tokens: 2,
                    decode_seconds: 0.375,
                    streams_completed: 1,
                    ..ModelFigures::default()
                }
            ),
        ])
    );
}

#[test]
fn the_existing_runtimes_stats_count_the_first_token_as_the_prefill() {
    let book = FigureBook::default();
    book.completed(
        "a",
        &StreamStats {
            tokens_generated: Some(20),
            time_to_first_token: Some(0.25),
            total_time: Some(1.0),
            ..StreamStats::default()
        },
    );
    // Figures it cannot use count as none; the stream still counts.
    book.completed(
        "a",
        &StreamStats {
            prompt_time: Some(-1.0),
            total_time: Some(-2.0),
            ..StreamStats::default()
        },
    );
    let a = &book.snapshot()["a"];
    assert_eq!(
        (
            a.prompt_tokens,
            a.prompt_seconds,
            a.generated_tokens,
            a.decode_seconds,
            a.streams_completed
        ),
        (0, 0.25, 20, 0.75, 2)
    );
}

#[test]
fn counters_outlive_loads_and_runtime_ends_while_the_batch_size_follows_the_load() {
    let book = FigureBook::default();
    book.loaded("a", 8);
    book.loaded("b", 1);
    book.completed("a", &stats(5, 0.5, 10, 2.0));
    book.unloaded("a");
    assert_eq!(book.snapshot()["a"].batch_size, 0);
    assert_eq!(book.snapshot()["b"].batch_size, 1);
    book.loaded("a", 4);
    book.all_unloaded();
    let after = book.snapshot();
    assert_eq!((after["a"].batch_size, after["b"].batch_size), (0, 0));
    assert_eq!(
        (after["a"].streams_completed, after["a"].generated_tokens),
        (1, 10)
    );
    // An unload of a model never seen adds nothing.
    book.unloaded("c");
    assert!(!book.snapshot().contains_key("c"));
}
