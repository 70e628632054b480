"""A character tokenizer for countdown-mini: digits, arithmetic and a few separators.

    tok = CharTokenizer()
    ids = tok.encode("3 5 7>22:")            # list[int]
    tok.decode(ids + [tok.eos_id, ...])      # text up to the first EOS, padding skipped
    batch, lengths = tok.encode_batch(prompts, left_pad=True)   # int32 (B, P), (B,)

Ids: 0 = PAD, 1 = BOS, 2 = EOS, then one id per character of `alphabet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_ALPHABET = "0123456789+-*/() >:=,"


class CharTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2
    n_special = 3

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._id = {c: i + self.n_special for i, c in enumerate(alphabet)}

    @property
    def eos_ids(self) -> tuple:
        return (self.eos_id,)

    @property
    def vocab_size(self) -> int:
        return self.n_special + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet "
                             f"{self.alphabet!r}; build CharTokenizer(alphabet=...) with it") from None

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i >= self.n_special and i < self.vocab_size:
                out.append(self.alphabet[i - self.n_special])
        return "".join(out)

    def encode_batch(self, texts: Sequence[str], *, left_pad: bool = True, length: int | None = None):
        """-> (ids int32 (B, length), lengths int32 (B,)); left padding by default (for generation)."""
        rows = [self.encode(t) for t in texts]
        lengths = np.asarray([len(r) for r in rows], np.int32)
        width = int(length or max(lengths.max(initial=0), 1))
        if lengths.max(initial=0) > width:
            raise ValueError(f"a text of {lengths.max()} tokens does not fit length {width}")
        out = np.full((len(rows), width), self.pad_id, np.int32)
        for i, r in enumerate(rows):
            if r:
                if left_pad:
                    out[i, width - len(r):] = r
                else:
                    out[i, :len(r)] = r
        return out, lengths
