// Goal: `watch` recognises exactly the subjects on which it would receive some
// `response.{requestId}` message, the ones that make a worker take it for a listening client.
// Method: NATS's matching rules (`*` one token, `>` one or more trailing tokens) applied by
// hand to patterns that do and do not match a response subject.

use super::covers_responses;

fn check(pattern: &str, expected: bool) {
    assert_eq!(covers_responses(pattern), expected, "{pattern:?}");
}

#[test]
fn patterns_that_match_a_response_subject_are_recognised() {
    for pattern in [
        ">",
        "response.>",
        "response.*",
        "*.*",
        "*.>",
        "response.r-1",
    ] {
        check(pattern, true);
    }
}

#[test]
fn patterns_that_cannot_match_a_response_subject_are_not() {
    for pattern in [
        "worker.>",
        "worker.*",
        "worker.heartbeat",
        "*",
        "response",
        "responses.>",
        "Response.>",
        "response.*.*",
        "response.*.>",
        "*.*.*",
        "*.*.>",
        "response.",
        "response..x",
        ".response.x",
        "",
    ] {
        check(pattern, false);
    }
}
