// Goal: a request whose id can be read always gets an answer on its response subject, even when
// its body does not parse, and a prompt that cuts an emoji in half (what JavaScript writes for
// it) is served rather than dropped.
// Method: bodies built by hand around one defect each (an unpaired surrogate escape, a byte that
// is not UTF-8, nesting past the bound, a size past the limit) go through `decode_request`; a
// table of broken bodies pins which `"requestId"` the lenient scan takes; proptest checks that
// the scan never panics, never returns an id the validator rejects, and agrees with the parser
// on every body the parser reads.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::scan_request_id;
use crate::limits::NATS_PAYLOAD_BYTES_MAX;
use crate::protocol::ErrorCode::{InvalidRequest as Invalid, PayloadTooLarge as TooLarge};
use crate::protocol::request::{Rejection, RequestLimits, decode_request};
use crate::protocol::subject::check_token;
use crate::protocol::tests::check;

/// A request for model `m` with id `s-1` whose prompt is `prompt`, written as JSON string
/// content (escapes included).
fn with_prompt(prompt: &str) -> Vec<u8> {
    format!(r#"{{"requestId":"s-1","modelId":"m","prompt":"{prompt}"}}"#).into_bytes()
}

/// `text` as bytes, with every `<FF>` replaced by the byte 0xFF (never valid in UTF-8).
fn with_bad_bytes(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for (i, piece) in text.split("<FF>").enumerate() {
        if i > 0 {
            out.push(0xFF);
        }
        out.extend_from_slice(piece.as_bytes());
    }
    out
}

#[test]
fn unpaired_surrogate_escapes_become_replacement_characters() {
    let prompt =
        |escaped: &str| match decode_request(&with_prompt(escaped), &RequestLimits::default()) {
            Ok(request) => request.prompt,
            Err(rejection) => panic!("{escaped} is rejected: {rejection:?}"),
        };
    // What `JSON.stringify` writes for a string cut after the first half of an emoji.
    assert_eq!(prompt(r"hi \ud83d"), "hi \u{FFFD}");
    assert_eq!(prompt(r"\ude00 hi"), "\u{FFFD} hi");
    assert_eq!(prompt(r"\ud83d\ude00"), "😀");
    assert_eq!(prompt(r"\uD83D\uDE00"), "😀");
    assert_eq!(prompt(r"\ud83d\ud83d\ude00"), "\u{FFFD}😀");
    assert_eq!(prompt(r"\ude00\ud83d"), "\u{FFFD}\u{FFFD}");
    assert_eq!(prompt(r"\udbff"), "\u{FFFD}");
    assert_eq!(prompt(r"\ud83d\n"), "\u{FFFD}\n");
    assert_eq!(prompt(r"\ud83d\u0041"), "\u{FFFD}A");
    assert_eq!(prompt(r"a\ud83d\ude00b\ud83d"), "a😀b\u{FFFD}");
    // A backslash escaped by another is text, and so is the `u` after it.
    assert_eq!(prompt(r"\\ud83d"), r"\ud83d");
    assert_eq!(prompt(r"\\\ud83d"), "\\\u{FFFD}");
    assert_eq!(prompt(r#"\"\ud83d"#), "\"\u{FFFD}");
}

#[test]
fn a_repaired_prompt_is_held_to_the_prompt_and_message_limits() {
    let limits = RequestLimits {
        payload_bytes_max: 128,
        prompt_bytes_max: 16,
        ..RequestLimits::default()
    };
    // A replacement character is 3 bytes of UTF-8: five fit in 16 bytes, six do not.
    let five = decode_request(&with_prompt(&r"\ud83d".repeat(5)), &limits).unwrap();
    assert_eq!(five.prompt, "\u{FFFD}".repeat(5));
    check(
        &with_prompt(&r"\ud83d".repeat(6)),
        &limits,
        Some("s-1"),
        TooLarge,
        "field \"prompt\" is 18 bytes, limit 16",
    );
    let long = with_prompt(&r"\ud83d".repeat(20));
    check(
        &long,
        &limits,
        Some("s-1"),
        TooLarge,
        &format!("message is {} bytes, limit 128", long.len()),
    );
}

#[test]
fn a_body_that_does_not_parse_is_rejected_on_its_readable_id() {
    let limits = RequestLimits::default();
    check(
        &with_bad_bytes(r#"{"requestId":"u-1","modelId":"m","prompt":"hi <FF>"}"#),
        &limits,
        Some("u-1"),
        Invalid,
        "invalid UTF-8 in the body at byte 46",
    );
    // A sequence cut short (the first two bytes of a three-byte character) at the very end.
    let mut cut = br#"{"requestId":"u-2","prompt":"#.to_vec();
    cut.extend_from_slice(&"€".as_bytes()[..2]);
    check(
        &cut,
        &limits,
        Some("u-2"),
        Invalid,
        "invalid UTF-8 in the body at byte 28",
    );
    // A request `id` whose field `x` holds `arrays` nested arrays.
    let nested = |id: &str, arrays: usize| {
        let (open, close) = ("[".repeat(arrays), "]".repeat(arrays));
        format!(r#"{{"requestId":"{id}","modelId":"m","prompt":"hi","x":{open}{close}}}"#)
    };
    // Thirty-three levels: the object and 32 arrays.
    check(
        nested("d-1", 32).as_bytes(),
        &limits,
        Some("d-1"),
        Invalid,
        "message nests deeper than 32 levels",
    );
    // Thirty-two levels are read.
    let deepest = decode_request(nested("d-2", 31).as_bytes(), &limits).unwrap();
    assert_eq!(deepest.request_id, "d-2");
    // The id may come after the part that nests too deep.
    let deep_first = format!(
        r#"{{"x":{}{},"requestId":"d-3"}}"#,
        "{\"a\":".repeat(40),
        "}".repeat(40)
    );
    check(
        deep_first.as_bytes(),
        &limits,
        Some("d-3"),
        Invalid,
        "message nests deeper than 32 levels",
    );
    // A body cut short.
    check(
        br#"{"requestId":"t-1","modelId":"m","prompt":"hi"#,
        &limits,
        Some("t-1"),
        Invalid,
        "message is not valid JSON: EOF while parsing a string at line 1 column 45",
    );
}

#[test]
fn only_a_top_level_request_id_is_recovered_from_a_broken_body() {
    let recovered = |text: &str| {
        decode_request(&with_bad_bytes(text), &RequestLimits::default())
            .expect_err("a broken body is rejected")
            .request_id
    };
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"requestId":"top","x":"<FF>"}"#, Some("top")),
        (r#"{"x":"<FF>","requestId":"last"}"#, Some("last")),
        (
            r#" { "requestId" : "spaced" , "x" : "<FF>" } "#,
            Some("spaced"),
        ),
        // Inside a nested object or array: not the request's own id.
        (r#"{"meta":{"requestId":"inner"},"x":"<FF>"}"#, None),
        (r#"{"list":["requestId","inner"],"x":"<FF>"}"#, None),
        (r#"{"list":[{"requestId":"inner"}],"x":"<FF>"}"#, None),
        // Inside a string value, quotes escaped.
        (r#"{"prompt":"{\"requestId\":\"inner\"}","x":"<FF>"}"#, None),
        (r#"{"prompt":"\\\"requestId\":\"inner","x":"<FF>"}"#, None),
        // A value, not a key, even where a colon follows it.
        (r#"{"modelId":"requestId","x":"<FF>"}"#, None),
        (r#"{"modelId":"requestId":"inner","x":"<FF>"}"#, None),
        // The real one beside decoys.
        (
            r#"{"prompt":"\"requestId\":\"inner\"","meta":{"requestId":"inner"},"requestId":"outer","x":"<FF>"}"#,
            Some("outer"),
        ),
        // A bracket closes a level whichever bracket opened it.
        (
            r#"{"a":[{"b":2]],"requestId":"after-mismatch","x":"<FF>"}"#,
            Some("after-mismatch"),
        ),
        (
            r#"{"a":[{"b":2],"requestId":"still-nested","x":"<FF>"}"#,
            None,
        ),
        // After the top-level object has closed, or when the top level is not an object.
        (r#"{"a":1}{"requestId":"second","x":"<FF>"}"#, None),
        (r#"[{"requestId":"in-array"},"<FF>"]"#, None),
        (r#""requestId":"bare","x":"<FF>""#, None),
        // Escapes decode as the parser decodes them, in the key and in the value.
        (r#"{"requestId":"r\u002d1","x":"<FF>"}"#, Some("r-1")),
        (
            r#"{"request\u0049d":"escaped-key","x":"<FF>"}"#,
            Some("escaped-key"),
        ),
        (r#"{"requestId":"r\ud83d","x":"<FF>"}"#, Some("r\u{FFFD}")),
        // An id the validator rejects is not recovered.
        (r#"{"requestId":"a.b","x":"<FF>"}"#, None),
        (r#"{"requestId":"a b","x":"<FF>"}"#, None),
        (r#"{"requestId":"","x":"<FF>"}"#, None),
        (r#"{"requestId":"a\nb","x":"<FF>"}"#, None),
        (r#"{"requestId":"r<FF>","x":1}"#, None),
        (r#"{"requestId":7,"x":"<FF>"}"#, None),
        (r#"{"requestId":null,"x":"<FF>"}"#, None),
        (r#"{"requestId":["r"],"x":"<FF>"}"#, None),
        (r#"{"requestId":"open<FF>"#, None),
        (r#"{"requestId":"<FF>"#, None),
        (r#"{"requestId"<FF>"#, None),
        // Two different ids are ambiguous; the same one twice is not.
        (r#"{"requestId":"one","requestId":"two","x":"<FF>"}"#, None),
        (r#"{"requestId":"one","requestId":7,"x":"<FF>"}"#, None),
        (
            r#"{"requestId":"same","requestId":"same","x":"<FF>"}"#,
            Some("same"),
        ),
    ];
    for (text, id) in cases {
        assert_eq!(recovered(text).as_deref(), *id, "{text}");
    }
    let long_id = format!(r#"{{"requestId":"{}","x":"<FF>"}}"#, "x".repeat(129));
    assert_eq!(recovered(&long_id), None);
    let longest_id = format!(r#"{{"requestId":"{}","x":"<FF>"}}"#, "x".repeat(128));
    assert_eq!(recovered(&longest_id), Some("x".repeat(128)));
}

#[test]
fn an_oversized_broken_body_names_its_id_when_the_scan_reaches_it() {
    let limits = RequestLimits {
        payload_bytes_max: 64,
        prompt_bytes_max: 16,
        max_tokens_max: 100,
        timeout_max: Duration::from_secs(60),
    };
    let body = with_bad_bytes(&format!(
        r#"{{"requestId":"big-1","prompt":"{}<FF>"}}"#,
        "x".repeat(100)
    ));
    check(
        &body,
        &limits,
        Some("big-1"),
        TooLarge,
        &format!("message is {} bytes, limit 64", body.len()),
    );
    // Too large to be parsed at all, but the id at its front is still found.
    let huge = format!(
        r#"{{"requestId":"big-2","prompt":"{}"}}"#,
        "x".repeat(5 * NATS_PAYLOAD_BYTES_MAX)
    );
    check(
        huge.as_bytes(),
        &RequestLimits::default(),
        Some("big-2"),
        TooLarge,
        &format!(
            "message is {} bytes, limit {NATS_PAYLOAD_BYTES_MAX}",
            huge.len()
        ),
    );
    // The scan stops after its bound: an id behind two payloads of prompt is not looked for.
    let late = with_bad_bytes(&format!(
        r#"{{"prompt":"{}<FF>","requestId":"big-3"}}"#,
        "x".repeat(2 * NATS_PAYLOAD_BYTES_MAX)
    ));
    check(
        &late,
        &RequestLimits::default(),
        None,
        TooLarge,
        &format!(
            "message is {} bytes, limit {NATS_PAYLOAD_BYTES_MAX}",
            late.len()
        ),
    );
}

/// Bytes that look like broken JSON: an opening brace, then pieces of JSON syntax, keys,
/// escapes, short strings (some of them bad ids) and raw bytes, in any order.
fn arb_broken_body() -> impl Strategy<Value = Vec<u8>> {
    let syntax = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\\",
        " ",
        "\"requestId\"",
        "\"request\\u0049d\"",
        "\"requestId\":",
        "\\ud83d",
        "\\ude00",
        "\\u002e",
        "\\\"",
        "null",
        "7",
    ])
    .prop_map(|piece| piece.as_bytes().to_vec());
    let piece = prop_oneof![
        4 => syntax,
        2 => "[a-z0-9.*> -]{0,8}".prop_map(|s| format!("\"{s}\"").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..4),
    ];
    prop::collection::vec(piece, 0..48).prop_map(|pieces| {
        let mut body = b"{".to_vec();
        body.extend(pieces.concat());
        body
    })
}

/// Strings a request may hold: decoys that mention `requestId`, ids good and bad, anything.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("requestId".to_owned()),
        Just(r#"{"requestId":"inner"}"#.to_owned()),
        "[A-Za-z0-9_-]{1,20}",
        "[a-z.*> \\\\\"]{0,10}",
        any::<String>(),
    ]
}

/// JSON objects whose keys are often `requestId`, at any level, with decoy strings inside.
fn arb_object() -> impl Strategy<Value = Map<String, Value>> {
    let key = prop_oneof![Just("requestId".to_owned()), "[a-z]{1,6}"];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        arb_text().prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(4, 32, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![Just("requestId".to_owned()), "[a-z]{1,6}"],
                inner,
                0..4
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    });
    prop::collection::btree_map(key, value, 0..6).prop_map(|map| map.into_iter().collect())
}

proptest! {
    #[test]
    fn the_scan_never_panics_and_returns_only_ids_the_validator_accepts(body in arb_broken_body()) {
        if let Some(id) = scan_request_id(&body) {
            prop_assert!(check_token(&id).is_ok(), "{id:?}");
        }
        for limits in [RequestLimits::default(), RequestLimits { payload_bytes_max: 16, ..RequestLimits::default() }] {
            if let Err(Rejection { request_id: Some(id), .. }) = decode_request(&body, &limits) {
                prop_assert!(check_token(&id).is_ok(), "{id:?}");
            }
        }
    }

    #[test]
    fn the_scan_finds_what_the_parser_reads_at_the_top_level(object in arb_object(), pretty in any::<bool>()) {
        let value = Value::Object(object);
        let body = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        let parsed = value["requestId"].as_str().filter(|id| check_token(id).is_ok());
        let scanned = scan_request_id(&body);
        prop_assert_eq!(scanned.as_deref(), parsed);
    }

    #[test]
    fn surrogate_escapes_read_as_utf16_does(units in prop::collection::vec(
        prop_oneof![0xD800u16..=0xDFFF, 0x20u16..=0x7E, any::<u16>()],
        0..12,
    )) {
        // Every code unit escaped, as a writer that escapes everything would.
        let escaped: String = units.iter().map(|unit| format!("\\u{unit:04x}")).collect();
        let request = decode_request(&with_prompt(&escaped), &RequestLimits::default());
        prop_assert_eq!(request.map(|r| r.prompt), Ok(String::from_utf16_lossy(&units)));
    }
}
