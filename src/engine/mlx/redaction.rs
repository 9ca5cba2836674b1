//! What of the runtime's words may reach a client: its error messages name files on the
//! host (the model's directory, its own source files), and a client has no business knowing
//! the host's layout. Each model directory becomes `<modelDir>`, keeping the model's place
//! below it (which the worker advertises anyway, in `modelPaths`); any other absolute path
//! becomes `<path>`.
//!
//! It only rewrites text; logging the full words is the caller's.

#[cfg(test)]
mod tests;

use std::path::PathBuf;

/// What a model directory becomes.
const MODEL_DIR: &str = "<modelDir>";
/// What any other absolute path becomes.
const PATH: &str = "<path>";

/// `text` without absolute paths; `roots` are the spellings of the model directories (relative
/// ones are ignored: they are not the host's layout).
///
/// A path starts with `/` at the start of the text or after a space, a quote, an opening
/// bracket, `=`, `:` or `,`, and runs up to a space, a quote, a closing bracket, `,` or `;`
/// (a final `.` or `:` is the sentence's).
pub(super) fn without_paths(text: &str, roots: &[PathBuf]) -> String {
    let mut roots: Vec<&str> = roots
        .iter()
        .filter(|r| r.is_absolute())
        .filter_map(|r| r.to_str())
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty())
        .collect();
    // The longest spelling first, so a nested one does not leave a tail behind.
    roots.sort_by_key(|r| std::cmp::Reverse(r.len()));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut at_boundary = true;
    while let Some(c) = rest.chars().next() {
        if c == '/' && at_boundary {
            let (replacement, len) = absolute_path(rest, &roots);
            if len > 0 {
                out.push_str(replacement);
                rest = &rest[len..];
                at_boundary = false;
                continue;
            }
        }
        out.push(c);
        at_boundary = starts_path(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What replaces the absolute path at the start of `text`, and its length in bytes; a
/// length of 0 when `text` starts with a `/` that is no path.
fn absolute_path<'a>(text: &str, roots: &[&'a str]) -> (&'a str, usize) {
    for root in roots {
        if let Some(after) = text.strip_prefix(root)
            && after
                .chars()
                .next()
                .is_none_or(|c| c == '/' || ends_path(c))
        {
            return (MODEL_DIR, root.len());
        }
    }
    let end = text.find(ends_path).unwrap_or(text.len());
    let path = text[..end].trim_end_matches(['.', ':']);
    // A lone `/` (or `//` of a URL) names nothing.
    match path.chars().nth(1) {
        Some(c) if c != '/' => (PATH, path.len()),
        _ => ("", 0),
    }
}

/// Whether a path may start right after `c`.
fn starts_path(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '(' | '[' | '{' | '<' | '=' | ':' | ',')
}

/// Whether `c` ends a path.
fn ends_path(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ']' | '}' | ',' | ';')
}
