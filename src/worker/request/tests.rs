//! The text a client reads when its stream broke with the link.

use super::interrupted_text;

#[test]
fn the_interrupted_text_says_what_happened_and_what_to_do() {
    insta::assert_snapshot!("interrupted_text", interrupted_text(17));
}
