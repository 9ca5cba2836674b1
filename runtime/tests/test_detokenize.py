"""IncrementalDecoder and TokenTexts: streamed pieces concatenate to the full
decode, with no replacement characters for text that later tokens complete,
and no text or chunk held back for more than DETOKENIZE_TOKENS_HELD_MAX tokens.

Method: in-process, with the tiny model's byte-level tokenizer (random id
sequences, multi-byte text split over byte tokens), a stand-in for a
SentencePiece decoder, which strips the leading space of the whole text, a
SentencePiece-style vocabulary with byte fallback decoded as Llama 2's
tokenizer decodes, and stand-ins for byte-level vocabularies whose tokens are
given byte strings (decoded the way byte-level BPE decodes: invalid UTF-8
becomes U+FFFD).
"""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from mlx_runtime.detokenize import IncrementalDecoder, TokenTexts
from mlx_runtime.limits import DETOKENIZE_TOKENS_HELD_MAX

REPLACEMENT = "\ufffd"


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


def byte_level(vocab: list[bytes]):
    """A decode for a vocabulary of byte strings, lossy like byte-level BPE."""

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    return decode


SINGLE_BYTES = [bytes([value]) for value in range(256)]


def longest_silence(pieces) -> int:
    """The most consecutive tokens that returned no text."""
    longest = run = 0
    for piece in pieces:
        run = 0 if piece else run + 1
        longest = max(longest, run)
    return longest


def chunks_of(decode, ids):
    """Every chunk TokenTexts releases, and the most that waited at any time."""
    texts = TokenTexts(decode)
    released: list[tuple[int, str]] = []
    waiting_max = 0
    for count, token_id in enumerate(ids, start=1):
        released += texts.add(token_id)
        waiting_max = max(waiting_max, count - len(released))
    return released + texts.finish(), waiting_max


@pytest.mark.parametrize("byte", [0x80, 0xBF, 0xC0, 0xFF])
def test_a_run_of_invalid_bytes_comes_out_within_the_hold_bound(byte):
    # Each of these bytes is invalid on its own, so each is one U+FFFD.
    decode = byte_level(SINGLE_BYTES)
    ids = [byte] * 600
    decoder = IncrementalDecoder(decode)
    emitted = ""
    for count, token_id in enumerate(ids, start=1):
        piece = decoder.add(token_id)
        assert len(piece) <= DETOKENIZE_TOKENS_HELD_MAX + 1, (
            f"token {count} returned {len(piece)} characters at once"
        )
        emitted += piece
        assert len(emitted) >= count - DETOKENIZE_TOKENS_HELD_MAX, (
            f"after {count} invalid bytes only {len(emitted)} characters came out, "
            f"at most {DETOKENIZE_TOKENS_HELD_MAX} may be held back"
        )
    assert emitted + decoder.finish() == decode(ids) == REPLACEMENT * len(ids)


def test_text_whose_tokens_all_split_characters_comes_out_within_the_hold_bound():
    # Every token ends one three-byte character and starts the next, so the
    # text decoded so far always ends in an unfinished character.
    text = "日本語の文章が続きます" * 20
    data = text.encode()
    vocab = [data[:1]] + [data[i : i + 3] for i in range(1, len(data) - 2, 3)] + [data[-2:]]
    ids = list(range(len(vocab)))
    decode = byte_level(vocab)
    decoder = IncrementalDecoder(decode)
    pieces = [decoder.add(token_id) for token_id in ids]
    rest = decoder.finish()
    assert "".join(pieces) + rest == text
    assert REPLACEMENT not in "".join(pieces) + rest
    assert longest_silence(pieces) <= DETOKENIZE_TOKENS_HELD_MAX, (
        f"{longest_silence(pieces)} tokens in a row returned nothing, "
        f"bound {DETOKENIZE_TOKENS_HELD_MAX}"
    )


@pytest.mark.parametrize("token_bytes_max", [1, 3])
def test_random_bytes_stream_exactly_and_within_the_hold_bound(token_bytes_max):
    # Mostly bytes that can take part in a character (ASCII, lead and
    # continuation bytes), so valid characters and broken ones both occur.
    rng = np.random.default_rng(token_bytes_max)
    alphabet = [*b"ab ", 0x80, 0x82, 0x9F, 0xA9, 0xBF, 0xC3, 0xE2, 0xF0, 0xF4, 0xFF]
    vocab = SINGLE_BYTES + [
        bytes(rng.choice(alphabet, size=rng.integers(2, token_bytes_max + 1)))
        for _ in range(200 if token_bytes_max > 1 else 0)
    ]
    decode = byte_level(vocab)
    for _ in range(100):
        if token_bytes_max == 1:
            ids = rng.choice(alphabet, size=80).tolist()
        else:
            ids = rng.integers(256, len(vocab), size=80).tolist()
        decoder = IncrementalDecoder(decode)
        pieces = [decoder.add(token_id) for token_id in ids]
        assert "".join(pieces) + decoder.finish() == decode(ids)
        assert longest_silence(pieces) <= DETOKENIZE_TOKENS_HELD_MAX, (
            f"{longest_silence(pieces)} tokens in a row returned nothing for {decode(ids)!r}, "
            f"bound {DETOKENIZE_TOKENS_HELD_MAX}"
        )


@pytest.mark.parametrize("invalid_before", [0, 1, 2, 3, 5, 9])
@pytest.mark.parametrize("split", [(2,), (1,), (1, 2), (1, 1, 1), (3,)])
def test_a_character_split_over_tokens_comes_out_once_and_whole(invalid_before, split):
    # "🙂" is four bytes; `split` gives where its tokens end (2 to 4 tokens).
    emoji = "🙂".encode()
    cuts = [0, *np.cumsum(split).tolist(), len(emoji)]
    vocab = [b"\x80"] + [emoji[a:b] for a, b in zip(cuts, cuts[1:])] + [b"!"]
    ids = [0] * invalid_before + list(range(1, len(cuts))) + [len(vocab) - 1]
    decoder = IncrementalDecoder(byte_level(vocab))
    pieces = [decoder.add(token_id) for token_id in ids]
    assert "".join(pieces) + decoder.finish() == REPLACEMENT * invalid_before + "🙂!"
    completing = invalid_before + len(split)
    assert pieces[completing].endswith("🙂"), "the token that completes it carries it"


@pytest.fixture(scope="module")
def byte_fallback():
    """A SentencePiece-style vocabulary: words, and one token per byte for the rest."""
    vocab = {"<unk>": 0} | {f"<0x{value:02X}>": 1 + value for value in range(256)}
    for word in ["\u2581", "\u2581Hello", "\u2581world", "!"]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )

    def ids_of(*units: str) -> list[int]:
        """Words by their tokens, anything else as its UTF-8 bytes."""
        ids = []
        for unit in units:
            ids += [vocab[unit]] if unit in vocab else [1 + value for value in unit.encode()]
        return ids

    return tokenizer, ids_of


@pytest.mark.parametrize(
    "units",
    [
        ("\u2581", "🙂"),
        ("\u2581Hello", "\u2581", "🙂", "!"),
        ("€", "\u2581", "日本", "🙂🙂", "\u2581world"),
    ],
)
def test_byte_fallback_characters_come_out_whole_after_a_token_without_text(byte_fallback, units):
    # A leading space the decoder strips adds no text, so it must not count
    # towards the bound while the character after it is still arriving.
    tokenizer, ids_of = byte_fallback
    ids = ids_of(*units)
    pieces, rest = pieces_of(lambda ids: tokenizer.decode(ids), ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids)
    assert REPLACEMENT not in "".join(pieces) + rest


def test_random_byte_fallback_text_streams_exactly(byte_fallback):
    tokenizer, ids_of = byte_fallback
    units = ["\u2581", "\u2581Hello", "\u2581world", "!", "€", "🙂", "日", "a"]
    rng = np.random.default_rng(2)
    for _ in range(200):
        ids = ids_of(*rng.choice(units, size=30))
        released, waiting_max = chunks_of(lambda ids: tokenizer.decode(ids), ids)
        assert "".join(text for _, text in released) == tokenizer.decode(ids)
        assert waiting_max <= DETOKENIZE_TOKENS_HELD_MAX


@pytest.mark.parametrize("token_bytes_max", [1, 3])
def test_at_most_the_bound_of_chunks_wait_and_every_token_gets_one(token_bytes_max):
    rng = np.random.default_rng(10 + token_bytes_max)
    alphabet = [*b"ab ", 0x80, 0x9F, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF]
    vocab = [
        bytes(rng.choice(alphabet, size=rng.integers(1, token_bytes_max + 1))) for _ in range(64)
    ]
    decode = byte_level(vocab)
    repeated = [[token_id] * 100 for token_id in range(8)]
    for ids in repeated + [rng.integers(0, len(vocab), size=80).tolist() for _ in range(100)]:
        released, waiting_max = chunks_of(decode, ids)
        assert [token_id for token_id, _ in released] == ids
        assert "".join(text for _, text in released) == decode(ids)
        assert waiting_max <= DETOKENIZE_TOKENS_HELD_MAX


def test_a_split_character_travels_on_the_chunk_of_the_token_that_completes_it():
    ids = list("🙂".encode())
    released, _ = chunks_of(byte_level(SINGLE_BYTES), ids)
    assert released == [(token_id, "") for token_id in ids[:-1]] + [(ids[-1], "🙂")]


def test_a_run_of_invalid_bytes_is_sent_chunk_by_chunk():
    ids = [0x80] * 10
    texts = TokenTexts(byte_level(SINGLE_BYTES))
    sent = [len(texts.add(token_id)) for token_id in ids]
    # The first tokens wait for a character they might begin; then each
    # token releases the one before it, whose byte is now known invalid.
    assert sent == [0] * DETOKENIZE_TOKENS_HELD_MAX + [DETOKENIZE_TOKENS_HELD_MAX] + [1] * (
        len(ids) - DETOKENIZE_TOKENS_HELD_MAX - 1
    )
    assert texts.finish() == [(0x80, REPLACEMENT)]


def test_finish_puts_held_back_text_on_the_last_chunk():
    ids = [ord("a"), 0xE2, 0x82]
    released, _ = chunks_of(byte_level(SINGLE_BYTES), ids)
    assert released == [(ord("a"), "a"), (0xE2, ""), (0x82, REPLACEMENT)]
