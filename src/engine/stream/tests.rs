// Goal: tokens reach the consumer in order, one per event while it keeps up and together once
// it has fallen behind; the sender waits only past the bound; the last event follows
// everything and nothing follows it; dropping the consumer's end stops the sender.
// Method: both ends in one test task; a send that must wait is a pinned future polled once,
// so "it waits" and "it went on" are observed, not timed; and both ends in tasks of their own on
// two threads, each yielding at its own pace, for every token once and in order.

use futures::FutureExt;

use super::*;
use crate::engine::{EngineError, FinishReason};

fn texts(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("t{i}")).collect()
}

fn tokens(texts: &[&str]) -> TokenEvent {
    TokenEvent::Tokens(texts.iter().map(|t| (*t).to_owned()).collect())
}

/// Every event the stream still gives without waiting, until its end.
async fn drain(rx: &mut TokenStream) -> Vec<TokenEvent> {
    let mut events = Vec::new();
    while let Some(event) = rx.recv().now_or_never() {
        match event {
            Some(event) => events.push(event),
            None => return events,
        }
    }
    events
}

#[tokio::test]
async fn tokens_go_one_per_event_while_the_consumer_keeps_up() {
    let (tx, mut rx) = token_channel(4);
    for text in ["a", "b"] {
        tx.send(text.to_owned()).await.unwrap();
        assert_eq!(rx.recv().await, Some(tokens(&[text])));
    }
    tx.send("c".to_owned()).await.unwrap();
    tx.send_all(vec!["d".to_owned(), "e".to_owned()])
        .await
        .unwrap();
    tx.end(TokenEvent::Finished(FinishReason::Stop.into()));
    drop(tx);
    assert_eq!(
        drain(&mut rx).await,
        [
            tokens(&["c"]),
            tokens(&["d", "e"]),
            TokenEvent::Finished(FinishReason::Stop.into())
        ]
    );
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn tokens_sent_while_the_channel_is_full_arrive_together_after_what_it_holds() {
    let (tx, mut rx) = token_channel(2);
    for text in ["a", "b", "c", "d", "e"] {
        // None of these waits: the channel takes two, the sender holds the rest.
        tx.send(text.to_owned()).now_or_never().unwrap().unwrap();
    }
    assert_eq!(rx.recv().await, Some(tokens(&["a"])));
    assert_eq!(rx.recv().await, Some(tokens(&["b"])));
    assert_eq!(rx.recv().await, Some(tokens(&["c", "d", "e"])));
    // Caught up: the next token goes on its own again.
    tx.send("f".to_owned()).await.unwrap();
    assert_eq!(rx.recv().await, Some(tokens(&["f"])));
}

#[tokio::test]
async fn held_tokens_go_with_the_next_token_once_the_channel_has_room() {
    let (tx, mut rx) = token_channel(1);
    tx.send("a".to_owned()).await.unwrap();
    tx.send("b".to_owned()).await.unwrap();
    assert_eq!(rx.recv().await, Some(tokens(&["a"])));
    // The channel has room again: what was held goes into it with the next token.
    tx.send("c".to_owned()).await.unwrap();
    tx.send("d".to_owned()).await.unwrap();
    assert_eq!(rx.recv().await, Some(tokens(&["b", "c"])));
    assert_eq!(rx.recv().await, Some(tokens(&["d"])));
}

#[tokio::test]
async fn the_last_event_follows_every_held_token_and_nothing_follows_it() {
    let (tx, mut rx) = token_channel(1);
    tx.send("a".to_owned()).await.unwrap();
    tx.send("b".to_owned()).await.unwrap();
    let failed = TokenEvent::Failed(EngineError::Generation {
        reason: "boom".to_owned(),
    });
    tx.end(failed.clone());
    assert!(tx.is_closed());
    assert_eq!(tx.send("late".to_owned()).await, Err(StreamClosed));
    tx.end(TokenEvent::Finished(FinishReason::Length.into()));
    drop(tx);
    assert_eq!(
        drain(&mut rx).await,
        [tokens(&["a"]), tokens(&["b"]), failed]
    );
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn the_last_event_waits_behind_a_full_channel_without_making_the_sender_wait() {
    let (tx, mut rx) = token_channel(1);
    tx.send("a".to_owned()).await.unwrap();
    tx.end(TokenEvent::Finished(FinishReason::Length.into()));
    assert_eq!(rx.recv().await, Some(tokens(&["a"])));
    assert_eq!(
        rx.recv().await,
        Some(TokenEvent::Finished(FinishReason::Length.into()))
    );
}

#[tokio::test]
async fn past_the_bound_the_sender_waits_until_the_consumer_takes_the_held_tokens() {
    let (tx, mut rx) = token_channel(1);
    tx.send("first".to_owned()).await.unwrap();
    for text in texts(0..TOKENS_HELD_MAX) {
        tx.send(text).now_or_never().unwrap().unwrap();
    }
    let mut blocked = Box::pin(tx.send("over".to_owned()));
    assert!(blocked.as_mut().now_or_never().is_none(), "held the bound");
    // Taking what the channel had is not enough: the held tokens are still held.
    assert_eq!(rx.recv().await, Some(tokens(&["first"])));
    assert!(
        blocked.as_mut().now_or_never().is_none(),
        "still at the bound"
    );
    assert_eq!(
        rx.recv().await,
        Some(TokenEvent::Tokens(texts(0..TOKENS_HELD_MAX)))
    );
    assert_eq!(blocked.await, Ok(()));
    assert_eq!(rx.recv().await, Some(tokens(&["over"])));
}

#[tokio::test]
async fn a_dropped_stream_stops_its_sender_also_while_it_waits() {
    let (tx, rx) = token_channel(1);
    tx.send("a".to_owned()).await.unwrap();
    for text in texts(0..TOKENS_HELD_MAX) {
        tx.send(text).await.unwrap();
    }
    let mut blocked = Box::pin(tx.send("over".to_owned()));
    assert!(blocked.as_mut().now_or_never().is_none());
    assert!(!tx.is_closed());
    assert!(tx.closed().now_or_never().is_none());
    drop(rx);
    assert_eq!(blocked.await, Err(StreamClosed));
    assert_eq!(tx.send("b".to_owned()).await, Err(StreamClosed));
    assert!(tx.is_closed());
    tx.closed().await;
}

#[tokio::test]
async fn tokens_held_when_the_sender_goes_away_are_still_delivered() {
    let (tx, mut rx) = token_channel(1);
    tx.send("a".to_owned()).await.unwrap();
    tx.send("b".to_owned()).await.unwrap();
    drop(tx);
    assert_eq!(rx.recv().await, Some(tokens(&["a"])));
    assert_eq!(rx.recv().await, Some(tokens(&["b"])));
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn a_consumer_waiting_on_an_empty_channel_gets_the_next_token() {
    let (tx, mut rx) = token_channel(1);
    let mut next = Box::pin(rx.recv());
    assert!(next.as_mut().now_or_never().is_none());
    tx.send("a".to_owned()).await.unwrap();
    assert_eq!(next.await, Some(tokens(&["a"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_arrives_once_in_order_when_both_ends_run_at_once() {
    const TOKENS: usize = 20_000;
    for round in 0..20 {
        let (tx, mut rx) = token_channel(1 + round % 4);
        let producer = tokio::spawn(async move {
            for (i, text) in texts(0..TOKENS).into_iter().enumerate() {
                tx.send(text).await.unwrap();
                if i % (7 + round) == 0 {
                    tokio::task::yield_now().await;
                }
            }
            tx.end(TokenEvent::Finished(FinishReason::Stop.into()));
        });
        let mut seen = Vec::with_capacity(TOKENS);
        let mut events = 0;
        loop {
            match rx.recv().await {
                Some(TokenEvent::Tokens(batch)) => {
                    assert!(!batch.is_empty(), "an empty event");
                    seen.extend(batch);
                }
                Some(TokenEvent::Finished(f)) if f.reason == FinishReason::Stop => break,
                other => panic!("unexpected {other:?}"),
            }
            events += 1;
            if events % (5 + round) == 0 {
                // Some rounds let the producer run far ahead, up to the bound.
                for _ in 0..=(round % 3) * 40 {
                    tokio::task::yield_now().await;
                }
            }
        }
        producer.await.unwrap();
        assert_eq!(seen, texts(0..TOKENS), "round {round}");
        assert_eq!(rx.recv().await, None);
    }
}
