"""CLIP and T5 tokenizers whose vocabulary is a fixed list of words.

Small models (the embedded ShapesWorld model, the tests' tiny Stable Diffusion) speak a small
language. Rather than ship CLIP's 49k-token BPE files, we build the same `CLIPTokenizer` class from
the words themselves: every word becomes one token through a chain of BPE merges, and any other
word falls back to single characters (or the unknown token). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as the tokenizer runs it: merge the lowest-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_level_clip_tokenizer(words: Iterable[str], max_length: int = 77):
    """A `transformers.CLIPTokenizer` with one token per word of `words` (ids: BOS 0, EOS/pad 1).

    Each word is first encoded with the merges made so far, and only the merges that finish it
    are appended. Appended merges rank last, so they never split a word finished before (a plain
    left-to-right chain per word would: "right" adds r+i before "triangle" adds t+r, and
    "triangle" would then come out in seven pieces).
    """
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for char in sorted({c for w in words for c in w}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def word_level_t5_tokenizer(words: Iterable[str], max_length: int = 77):
    """A T5-style fast tokenizer with one token per word of `words` (pad 0, end-of-text 1,
    unknown 2; "</s>" closes every text), for tiny T5 encoders in tests and benchmarks: the real
    sentencepiece model is not downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                             special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)
