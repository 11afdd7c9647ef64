"""Corpora: word-level folders (WikiText / PTB layout) read from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microsweep import data
from microsweep.errors import DataError


def test_ptb_trains_on_valid_and_evaluates_on_test():
    corpus = data.ptb(train="valid", val="test")
    folder = Path(corpus.source.split(" (")[0])
    valid = (folder / "valid.txt").read_text().splitlines()
    test = (folder / "test.txt").read_text().splitlines()
    # one <eos> closes every line; every word of the training split is in the vocabulary
    assert len(corpus.train) == sum(len(line.split()) + 1 for line in valid)
    assert len(corpus.val) == sum(len(line.split()) + 1 for line in test)
    words = {w for line in valid for w in line.split()}
    assert set(corpus.vocab) == words | {"<eos>", "<unk>"}
    # test words the training split never saw read as <unk>
    unseen = [w for line in test for w in line.split() if w not in words]
    unk = corpus.vocab.index("<unk>")
    n_unk_text = sum(1 for line in test for w in line.split() if w == "<unk>")
    assert int((corpus.val == unk).sum()) == n_unk_text + len(unseen) > 0
    assert corpus.decode(corpus.train[:5]) == " ".join(valid[0].split()[:5])
    assert corpus.level == "word" and len(corpus.fingerprint) == 16
    again = data.word_corpus(folder, train="valid", val="test")
    assert again.fingerprint == corpus.fingerprint
    other = data.word_corpus(folder, train="test", val="valid")
    assert other.fingerprint != corpus.fingerprint


def test_wikitext_folder_and_bad_arguments(tmp_path):
    shared = Path(data.ptb(train="valid", val="test").source.split(" (")[0]).parent
    wiki = data.word_corpus(shared / "wikitext-2", train="valid", val="test")
    assert wiki.vocab_size > 10_000 and wiki.encode("the <unk> qwertyuiop")[-1] == wiki.vocab.index(
        "<unk>"
    )
    with pytest.raises(DataError, match="does not exist"):
        data.word_corpus(tmp_path / "nowhere")
    with pytest.raises(DataError, match="both 'valid'"):
        data.word_corpus(shared / "ptb", train="valid", val="valid")
    with pytest.raises(DataError, match="does not exist"):
        data.word_corpus(shared / "ptb", train="train", val="test")  # no training split here
    with pytest.raises(DataError, match="no PTB folder"):
        data.ptb(tmp_path / "missing")


def test_wikitext2_loader_reads_its_folder_and_wiki_token_file_names(tmp_path):
    corpus = data.wikitext2(train="valid", val="test")
    folder = Path(corpus.source.split(" (")[0])
    assert corpus.name == "wikitext-2" and folder.name == "wikitext-2"
    valid = (folder / "valid.txt").read_text().splitlines()
    assert len(corpus.train) == sum(len(line.split()) + 1 for line in valid)
    # the distributed names (wiki.valid.tokens ...) read the same as {split}.txt
    for split in ("valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text((folder / f"{split}.txt").read_text())
    same = data.wikitext103(tmp_path, train="valid", val="test")
    assert same.vocab == corpus.vocab and torch.equal(same.val, corpus.val)
    assert same.name == "wikitext-103"
    with pytest.raises(DataError, match="no WikiText-103 folder"):
        data.wikitext103(tmp_path / "missing")
