"""IncrementalDecoder: streamed pieces concatenate to the full decode, with no
replacement characters for text that later tokens complete.

Method: in-process, with the tiny model's byte-level tokenizer (random id
sequences, multi-byte text split over byte tokens) and a stand-in for a
SentencePiece decoder, which strips the leading space of the whole text.
"""

import numpy as np
import pytest
from tokenizers import Tokenizer

from mlx_runtime.detokenize import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def pieces_of(decode, ids):
    decoder = IncrementalDecoder(decode)
    pieces = [decoder.add(token_id) for token_id in ids]
    return pieces, decoder.finish()


def test_pieces_concatenate_to_the_decode_of_random_ids(tokenizer):
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    rng = np.random.default_rng(1)
    for _ in range(200):
        ids = rng.integers(0, tokenizer.get_vocab_size(), size=40).tolist()
        pieces, rest = pieces_of(decode, ids)
        assert "".join(pieces) + rest == decode(ids)


@pytest.mark.parametrize(
    "text",
    ["naïve café", "日本語のテキスト", "emoji 🙂 and €", " leading space", "tab\tand\nnewline"],
)
def test_complete_text_streams_without_replacement_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, rest = pieces_of(lambda ids: tokenizer.decode(ids), ids)
    assert "".join(pieces) == text
    assert rest == ""
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_multibyte_character_is_emitted_by_the_token_that_completes_it(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False).ids
    assert len(ids) > 1, "precondition: the emoji is split over byte tokens"
    pieces, _ = pieces_of(lambda ids: tokenizer.decode(ids), ids)
    assert pieces == [""] * (len(ids) - 1) + ["🙂"]


def test_an_incomplete_character_at_the_end_is_flushed_by_finish(tokenizer):
    ids = tokenizer.encode("€", add_special_tokens=False).ids[:-1]
    pieces, rest = pieces_of(lambda ids: tokenizer.decode(ids), ids)
    assert pieces == [""] * len(ids)
    assert rest == tokenizer.decode(ids)
    assert rest.startswith("\ufffd")


def test_a_decoder_that_strips_the_leading_space_keeps_spaces_between_words():
    vocab = ["\u2581Hello", "\u2581world", "!", "\u2581again"]

    def decode(ids):
        text = "".join(vocab[i] for i in ids).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text

    ids = [0, 1, 2, 3]
    pieces, rest = pieces_of(decode, ids)
    assert pieces == ["Hello", " world", "!", " again"]
    assert "".join(pieces) + rest == decode(ids)
