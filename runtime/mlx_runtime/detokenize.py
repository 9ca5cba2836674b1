"""Token ids to text pieces, one token at a time, exactly matching a full decode.

Invariant: the pieces returned by `add` and `finish` concatenate to
`tokenizer.decode(all_ids, skip_special_tokens=False)`.

mlx_lm's streaming detokenizers are not used because its byte-level BPE one
drops a leading space of the first generated token, which `decode` keeps,
so streamed text would differ from the decoded ids (and a prompt plus its
completion would lose a space).

Method: decode a short window of recent ids and emit what it adds to the
text already emitted. The window starts one emission back, which gives
tokenizers that strip a leading space (SentencePiece) the left context they
need. Text ending in U+FFFD is held back until more ids arrive, since it is
usually an incomplete UTF-8 sequence spread over several byte tokens.
Each step decodes only the window, so the cost is linear except while
incomplete text accumulates (bounded by the number of generated tokens).
"""

from collections.abc import Callable

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        """`decode` maps ids to text; pass the tokenizer's, special tokens kept."""
        self._decode = decode
        self._ids: list[int] = []
        # _ids[_prefix:_read] is context already emitted; _ids[_read:] is not yet emitted.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """The text this token completes; "" while the text is incomplete."""
        self._ids.append(token_id)
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(context) or window.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(context) :]

    def finish(self) -> str:
        """Whatever is still held back, decoded as it stands."""
        if self._read == len(self._ids):
            return ""
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return window[len(context) :]
