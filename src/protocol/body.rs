//! Passes over the raw bytes of an inbound message, beside the JSON parser.
//!
//! [`check_depth`] and [`check_utf8`] refuse what the parser must not see; [`repair_surrogates`]
//! rewrites what the parser would refuse but JSON readers elsewhere accept (a lone surrogate
//! escape, which JavaScript writes for a string cut in the middle of an emoji); and
//! [`scan_request_id`] reads the request id of a body the parser could not read, so that its
//! refusal still reaches `response.{requestId}`. Each is one pass through a lexer ([`Pieces`])
//! that never fails: it knows strings with their escapes, brackets, `:` and `,`, and nothing
//! else of JSON. Reading the fields of a parsed message is `request`'s part, not this module's.

use std::borrow::Cow;

use super::subject::check_token;
use crate::limits::{ID_BYTES_MAX, JSON_DEPTH_MAX, REQUEST_ID_SCAN_BYTES_MAX};

/// The key the scan looks for, as a JSON string without escapes.
const REQUEST_ID_KEY: &[u8] = br#""requestId""#;

/// Bytes of JSON string escape for one byte of UTF-8, at most (`\u0041` is 6 bytes for `A`).
const ESCAPE_BYTES_PER_BYTE_MAX: usize = 6;

/// What the passes over the raw bytes refuse; the decoder turns it into its own error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyError {
    /// Nesting deeper than [`JSON_DEPTH_MAX`].
    TooDeep,
    /// Bytes that are not UTF-8, the first at `offset`.
    InvalidUtf8 {
        /// Offset of the first bad byte, from 0.
        offset: usize,
    },
}

/// Rejects input nesting deeper than [`JSON_DEPTH_MAX`] before the parser recurses into it.
pub(super) fn check_depth(payload: &[u8]) -> Result<(), BodyError> {
    let mut depth = 0usize;
    for piece in Pieces::new(payload) {
        match piece {
            Piece::Open(_) => {
                depth += 1;
                if depth > JSON_DEPTH_MAX {
                    return Err(BodyError::TooDeep);
                }
            }
            Piece::Close => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Rejects a message that is not UTF-8 (as JSON on the wire must be), naming the offset of the
/// first byte that is not.
pub(super) fn check_utf8(payload: &[u8]) -> Result<(), BodyError> {
    match std::str::from_utf8(payload) {
        Ok(_) => Ok(()),
        Err(err) => Err(BodyError::InvalidUtf8 {
            offset: err.valid_up_to(),
        }),
    }
}

/// Replaces every surrogate escape that is not half of a pair (`\ud83d` alone, or a low half
/// with no high half before it) with `\uFFFD`, the replacement character, as JavaScript's and
/// Python's readers do. A correctly paired escape is left for the parser to decode. The
/// rewrite keeps every byte offset (both escapes are six bytes), and borrows when there is
/// nothing to replace.
pub(super) fn repair_surrogates(payload: &[u8]) -> Cow<'_, [u8]> {
    let mut repaired: Option<Vec<u8>> = None;
    for piece in Pieces::new(payload) {
        if let Piece::Str { start, end, .. } = piece {
            for_each_lone_surrogate(&payload[start..end], |at| {
                let out = repaired.get_or_insert_with(|| payload.to_vec());
                let digits = start + at + 2;
                out[digits..digits + 4].copy_from_slice(b"FFFD");
            });
        }
    }
    repaired.map_or(Cow::Borrowed(payload), Cow::Owned)
}

/// Reads the request id of a body that does not parse, leniently and within bounds, or `None`.
///
/// The scan looks at the first [`REQUEST_ID_SCAN_BYTES_MAX`] bytes in one pass, decodes each
/// top-level key only when it holds an escape and is short enough to be `requestId`, and
/// decodes one value of at most `2 + 6 × ID_BYTES_MAX` bytes; its work is linear in the bytes
/// it looks at. What it returns has passed [`check_token`], like any decoded id.
///
/// The top level is the first object of the body, and the rule is:
/// - the body begins, after whitespace, with `{`; otherwise there is no top level;
/// - outside strings, `{` and `[` open a level and `}` and `]` close one, whichever opened it;
///   strings are skipped whole with their escapes, so nothing inside a string value counts;
/// - a key is a string at the first level that follows the opening `{` or a `,` of that level,
///   and is itself followed by `:`; a string in value position is never a key;
/// - the id is the string that follows the key `requestId` (escapes decoded as the parser
///   decodes them) and its `:`;
/// - the scan ends when the first level closes, or at the bytes' end or the bound;
/// - a `requestId` key whose value is not a complete string, or two of them with different
///   values, leave no id.
pub(super) fn scan_request_id(payload: &[u8]) -> Option<String> {
    let window = payload.get(..REQUEST_ID_SCAN_BYTES_MAX).unwrap_or(payload);
    let mut pieces = Pieces::new(window);
    if pieces.next() != Some(Piece::Open(b'{')) {
        return None;
    }
    let mut depth = 1usize;
    let mut expect = Expect::Key;
    let mut seen = Seen::Nothing;
    for piece in pieces {
        match piece {
            Piece::Open(_) => {
                if depth == 1 {
                    seen.note_if_id(expect, None);
                    expect = Expect::Nothing;
                }
                depth += 1;
            }
            Piece::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ if depth > 1 => {}
            Piece::Comma => expect = Expect::Key,
            Piece::Colon => {
                expect = match expect {
                    Expect::Colon { id } => Expect::Value { id },
                    _ => Expect::Nothing,
                }
            }
            Piece::Str { start, end, closed } => {
                let string = &window[start..end];
                expect = match expect {
                    Expect::Key => Expect::Colon {
                        id: closed && is_request_id_key(string),
                    },
                    _ => {
                        seen.note_if_id(expect, closed.then_some(string));
                        Expect::Nothing
                    }
                };
            }
            Piece::Other => {
                seen.note_if_id(expect, None);
                expect = Expect::Nothing;
            }
        }
    }
    let Seen::Id(string) = seen else {
        return None;
    };
    decode_string(string, ID_BYTES_MAX).filter(|id| check_token(id).is_ok())
}

/// What the scan waits for next at the top level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A key (after the opening `{` or a `,`).
    Key,
    /// The `:` after a key; `id` when the key was `requestId`.
    Colon { id: bool },
    /// A value; `id` when it belongs to `requestId`.
    Value { id: bool },
    /// Nothing the scan reads (a value's rest, or garbage) until the next `,`.
    Nothing,
}

/// The values of the top-level `requestId` keys seen so far.
#[derive(Clone, Copy, Debug)]
enum Seen<'a> {
    /// None yet.
    Nothing,
    /// One string value (quotes included), maybe repeated.
    Id(&'a [u8]),
    /// A value that is not a complete string, or two different ones.
    Unusable,
}

impl<'a> Seen<'a> {
    /// Notes a top-level value met while the scan expected `expect`, when it is the value of a
    /// `requestId`: the raw string, or `None` for anything else.
    fn note_if_id(&mut self, expect: Expect, value: Option<&'a [u8]>) {
        if expect != (Expect::Value { id: true }) {
            return;
        }
        *self = match (*self, value) {
            (Seen::Nothing, Some(string)) => Seen::Id(string),
            (Seen::Id(first), Some(string)) if first == string => Seen::Id(first),
            _ => Seen::Unusable,
        };
    }
}

/// Whether a raw JSON string (quotes included) decodes to `requestId`.
fn is_request_id_key(string: &[u8]) -> bool {
    string == REQUEST_ID_KEY
        || (string.contains(&b'\\')
            && decode_string(string, REQUEST_ID_KEY.len() - 2).as_deref() == Some("requestId"))
}

/// Decodes a raw JSON string (quotes included) as the request parser would, lone surrogates
/// repaired; `None` when it is malformed or when it is too long to decode to at most
/// `decoded_bytes_max` bytes (which is then not even tried).
fn decode_string(string: &[u8], decoded_bytes_max: usize) -> Option<String> {
    if string.len() > 2 + ESCAPE_BYTES_PER_BYTE_MAX * decoded_bytes_max {
        return None;
    }
    serde_json::from_slice::<String>(&repair_surrogates(string)).ok()
}

/// Calls `replace` with the offset of each `\uXXXX` escape in `string` (a raw JSON string,
/// opening quote first) that is an unpaired surrogate.
fn for_each_lone_surrogate(string: &[u8], mut replace: impl FnMut(usize)) {
    let mut i = 1;
    while let Some(&byte) = string.get(i) {
        if byte != b'\\' {
            i += 1;
            continue;
        }
        match code_unit_at(string, i) {
            Some(unit) if is_high_surrogate(unit) => {
                if code_unit_at(string, i + 6).is_some_and(is_low_surrogate) {
                    i += 12;
                } else {
                    replace(i);
                    i += 6;
                }
            }
            Some(unit) if is_low_surrogate(unit) => {
                replace(i);
                i += 6;
            }
            // Any other escape: its second byte is never a quote or a backslash that counts.
            _ => i += 2,
        }
    }
}

/// The UTF-16 code unit of the `\uXXXX` escape starting at `at`, when there is one.
fn code_unit_at(bytes: &[u8], at: usize) -> Option<u16> {
    match bytes.get(at..at + 6)? {
        [b'\\', b'u', digits @ ..] if digits.iter().all(u8::is_ascii_hexdigit) => {
            u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
        }
        _ => None,
    }
}

fn is_high_surrogate(unit: u16) -> bool {
    (0xD800..=0xDBFF).contains(&unit)
}

fn is_low_surrogate(unit: u16) -> bool {
    (0xDC00..=0xDFFF).contains(&unit)
}

/// One piece of JSON as the lenient lexer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// `{` or `[`, outside a string.
    Open(u8),
    /// `}` or `]`, outside a string.
    Close,
    /// `:`, outside a string.
    Colon,
    /// `,`, outside a string.
    Comma,
    /// A string: bytes `start..end` run from its opening quote to just after its closing one,
    /// or to the end of the input when it is not `closed`.
    Str {
        start: usize,
        end: usize,
        closed: bool,
    },
    /// Any other byte outside a string, whitespace aside (digits, literals, garbage).
    Other,
}

/// The pieces of some bytes, in order; never fails, whatever the bytes.
struct Pieces<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Pieces<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Pieces { bytes, pos: 0 }
    }
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        loop {
            let start = self.pos;
            let &byte = self.bytes.get(start)?;
            self.pos += 1;
            return Some(match byte {
                b'{' | b'[' => Piece::Open(byte),
                b'}' | b']' => Piece::Close,
                b':' => Piece::Colon,
                b',' => Piece::Comma,
                b'"' => {
                    let (end, closed) = string_end(self.bytes, start);
                    self.pos = end;
                    Piece::Str { start, end, closed }
                }
                b' ' | b'\t' | b'\n' | b'\r' => continue,
                _ => Piece::Other,
            });
        }
    }
}

/// Where the string opened at `open` ends: just after its closing quote, or the end of
/// `bytes` when it does not close; and whether it closed.
fn string_end(bytes: &[u8], open: usize) -> (usize, bool) {
    let mut i = open + 1;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'"' => return (i + 1, true),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    (bytes.len(), false)
}

#[cfg(test)]
mod tests;
