"""Incremental detokenization with stop strings, in the style of vLLM.

Each step decodes only a small window of tokens (prefix_offset..end) and emits the text beyond
what the window's head (prefix_offset..read_offset) already produced. Decoding in context keeps
tokenizer-specific joining right (leading spaces, byte merges) without re-decoding the whole
output each step; a window whose text ends in U+FFFD is an incomplete UTF-8 character, so the
offsets stay put until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

# How many prompt tokens to decode as left context for the first output tokens (vLLM uses 5).
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,  # transformers PreTrainedTokenizerBase
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._special_ids = set(tokenizer.all_special_ids)
        self.stop = list(stop)
        if not all(self.stop):
            raise ValueError("stop strings must be non-empty")
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens  # like vLLM, stop strings only count once this many tokens exist
        self._max_stop = max(map(len, self.stop), default=0)
        # Chars that might be the start of a stop string are held back from streaming; not needed
        # when the stop string is output anyway.
        self._holdback = 0 if include_stop_str_in_output else max(self._max_stop - 1, 0)

        ctx = list(prompt_token_ids[-(_CONTEXT + 1) :])
        toks = tokenizer.convert_ids_to_tokens(ctx, skip_special_tokens=skip_special_tokens)
        self._tokens: list[str] = [t or "" for t in toks]
        self._read = len(self._tokens)
        self._prefix = max(self._read - _CONTEXT, 0)

        self.token_ids: list[int] = []  # output token ids fed so far
        self.text = ""  # output text so far (complete characters only, until flush())
        self.stop_reason: str | None = None  # the stop string that ended the output, if any
        self._sent = 0  # len(text) already returned by new_text()/flush()
        self._finished = False

    def _decode_window(self, force: bool) -> str:
        """Text that tokens[read:] add after tokens[prefix:read]; "" while a char is incomplete."""
        convert = self.tokenizer.convert_tokens_to_string
        prefix_text = convert(self._tokens[self._prefix : self._read])
        full = convert(self._tokens[self._prefix :])
        if not force and (len(full) <= len(prefix_text) or full.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return full[len(prefix_text) :]

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        # A stop string not found before can only end inside `delta`, so it starts at most
        # max_stop-1 chars before it.
        start = max(len(self.text) - self._max_stop + 1, 0)
        self.text += delta
        best: tuple[int, str] | None = None
        for s in self.stop:  # earliest match wins; ties go to the first listed
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None or len(self.token_ids) < self.min_tokens:
            return None
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop_str_in_output else i]
        self.stop_reason, self._finished = s, True
        return s

    def add_token(self, token_id: int) -> str | None:
        """Append one output token; return the stop string if one now matches (text truncated)."""
        if self._finished:
            raise RuntimeError("add_token() after a stop string matched or flush()")
        self.token_ids.append(token_id)
        if self.skip_special_tokens and token_id in self._special_ids:
            return None
        self._tokens.append(self.tokenizer.convert_ids_to_tokens(token_id) or "")
        return self._append(self._decode_window(force=False))

    @property
    def visible_text(self) -> str:
        """All text that may be shown now: everything once finished, else without a tail that could still
        begin a stop string (the same text new_text() streams)."""
        return self.text if self._finished else self.text[: max(len(self.text) - self._holdback, self._sent)]

    def new_text(self) -> str:
        """Text added since the last call, minus a tail that could still begin a stop string."""
        end = len(self.text) if self._finished else max(len(self.text) - self._holdback, self._sent)
        out, self._sent = self.text[self._sent : end], end
        return out

    def flush(self) -> str:
        """Finish without a stop match: return everything not yet streamed, incomplete bytes
        included (as U+FFFD, matching a full decode)."""
        if not self._finished:
            if self._read < len(self._tokens):
                self._append(self._decode_window(force=True))
            self._finished = True
        return self.new_text()
