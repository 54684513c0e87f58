"""A CLIP tokenizer whose vocabulary is a fixed list of words.

Small models (the embedded ShapesWorld model, the tests' tiny Stable Diffusion) speak a small
language. Rather than ship CLIP's 49k-token BPE files, we build the same `CLIPTokenizer` class from
the words themselves: every word becomes one token through a chain of BPE merges, and any other
word falls back to single characters (or the unknown token). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def word_level_clip_tokenizer(words: Iterable[str], max_length: int = 77):
    """A `transformers.CLIPTokenizer` with one token per word of `words` (ids: BOS 0, EOS/pad 1)."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in sorted({c for w in words for c in w}):
        add(char)
        add(char + "</w>")
    for word in words:
        # "red" = r + e + d</w>: merge left to right, r·e → re, re·d</w> → red</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            add(merged)
            pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
