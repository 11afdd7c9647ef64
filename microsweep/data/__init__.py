"""Corpora: fixed tokenized splits from a path, ``$MICROSWEEP_DATA`` or a download cache."""

from microsweep.data._corpus import (
    Corpus,
    cache_dir,
    ptb,
    text_file,
    tiny_shakespeare,
    wikitext2,
    wikitext103,
    word_corpus,
)

__all__ = [
    "Corpus",
    "cache_dir",
    "ptb",
    "text_file",
    "tiny_shakespeare",
    "wikitext103",
    "wikitext2",
    "word_corpus",
]
