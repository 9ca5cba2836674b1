"""Token ids to text pieces, one token at a time, exactly matching a full decode.

Invariant: the pieces returned by `add` and `finish` concatenate to
`tokenizer.decode(all_ids, skip_special_tokens=False)`. (One exception:
SentencePiece byte fallback turns a whole run of byte tokens into U+FFFD when
any of its bytes is invalid, which a window of recent ids cannot see, so
around invalid bytes such a stream may differ from the full decode.)

mlx_lm's streaming detokenizers are not used because its byte-level BPE one
drops a leading space of the first generated token, which `decode` keeps,
so streamed text would differ from the decoded ids (and a prompt plus its
completion would lose a space).

Method: decode a short window of recent ids and emit what it adds to the
text already emitted. The window starts one emission back, which gives
tokenizers that strip a leading space (SentencePiece) the left context they
need. Text ending in U+FFFD is held back until more ids arrive, since it is
usually an incomplete UTF-8 sequence spread over several byte tokens.

Bound: text is held back for at most `DETOKENIZE_TOKENS_HELD_MAX` tokens,
counted from the token after which it first ended in U+FFFD. A character is
at most 4 bytes, so it is complete by then; if the text still ends in U+FFFD,
everything before that last U+FFFD is final and is emitted (invalid bytes as
U+FFFD), and only the last one, which may still be the start of a character,
stays back. The window then restarts that many tokens back, where such a
start must lie, remembering how much of its text is already out: each step
decodes a few tokens, so the cost stays linear. A token that adds no text
of its own (a leading space the decoder strips) waits just as long.
"""

from collections.abc import Callable

from .limits import DETOKENIZE_TOKENS_HELD_MAX

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        """`decode` maps ids to text; pass the tokenizer's, special tokens kept."""
        self._decode = decode
        self._ids: list[int] = []
        # _ids[_prefix:_read] is context already emitted; _ids[_read:] is not
        # settled, but the first _sent characters of its text are emitted.
        self._prefix = 0
        self._read = 0
        self._sent = 0
        # Where the unsettled text last started to end in U+FFFD; None while it does not.
        self._incomplete_from: int | None = None

    @property
    def holding(self) -> bool:
        """Whether the text of some added tokens may still change (not all of it is out)."""
        return self._read < len(self._ids)

    def add(self, token_id: int) -> str:
        """The text this token makes final; "" while the text is incomplete."""
        self._ids.append(token_id)
        end = len(self._ids)
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        start = len(context) + self._sent
        if not window.endswith(_REPLACEMENT):
            # Complete, or nothing new yet (a token without text of its own,
            # such as a leading space the decoder strips), which waits for
            # its successors only up to the bound.
            if len(window) > start or end - self._read > DETOKENIZE_TOKENS_HELD_MAX:
                self._settle()
                return window[start:]
            self._incomplete_from = None
            return ""
        if self._incomplete_from is None:
            self._incomplete_from = end - 1
        if end - self._incomplete_from <= DETOKENIZE_TOKENS_HELD_MAX:
            return ""
        final = window[:-1]
        piece = final[start:]
        unsent = window[start + len(piece) :]
        # An unfinished character began within the last HELD_MAX tokens: its
        # bytes number at most 3 and every token has at least one.
        restart = end - DETOKENIZE_TOKENS_HELD_MAX
        restarted = self._decode(self._ids[restart:])
        if restarted.endswith(unsent):
            self._prefix = self._read = restart
            self._sent = len(restarted) - len(unsent)
        else:
            self._sent = start + len(piece) - len(context)
        return piece

    def finish(self) -> str:
        """Whatever is still held back, decoded as it stands."""
        if not self.holding:
            return ""
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        piece = window[len(context) + self._sent :]
        self._settle()
        return piece

    def _settle(self) -> None:
        """Everything added so far is out; it becomes the next window's context."""
        self._prefix, self._read = self._read, len(self._ids)
        self._sent = 0
        self._incomplete_from = None


class TokenTexts:
    """Pairs every generated token with its share of the text, for one chunk per token.

    A chunk whose text is still incomplete waits until a later token completes
    the text, or the stream ends and the held-back text goes on the last
    waiting chunk. This keeps the concatenated text exact without delaying
    visible text. While the decoder keeps back an unfinished character, only
    the newest chunk waits for it: text that became final is sent on the
    chunk before it. So at most `DETOKENIZE_TOKENS_HELD_MAX` chunks wait.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        """`decode` as for `IncrementalDecoder`."""
        self._decoder = IncrementalDecoder(decode)
        self._waiting: list[tuple[int, str]] = []

    def add(self, token_id: int) -> list[tuple[int, str]]:
        """The (token id, text) chunks to send now, in order; often none or one."""
        text = self._decoder.add(token_id)
        self._waiting.append((token_id, text))
        if not self._decoder.holding:
            return self._release_all()
        if len(self._waiting) > 1 and (text or len(self._waiting) > DETOKENIZE_TOKENS_HELD_MAX):
            return self._release_all_but_newest()
        return []

    def finish(self) -> list[tuple[int, str]]:
        """The chunks still waiting, the held-back text on the last of them."""
        held_back = self._decoder.finish()
        if not self._waiting:
            assert not held_back, "text is held back only together with its chunks"
            return []
        last_id, last_text = self._waiting[-1]
        self._waiting[-1] = (last_id, last_text + held_back)
        return self._release_all()

    def _release_all(self) -> list[tuple[int, str]]:
        ready, self._waiting = self._waiting, []
        return ready

    def _release_all_but_newest(self) -> list[tuple[int, str]]:
        """The newest chunk keeps waiting for the held-back text; its final text goes now."""
        *ready, (newest_id, newest_text) = self._waiting
        last_id, last_text = ready[-1]
        ready[-1] = (last_id, last_text + newest_text)
        self._waiting = [(newest_id, "")]
        return ready
