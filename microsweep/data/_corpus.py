"""Corpora as fixed token splits: read from a path, an environment variable, or a download cache.

A `Corpus` holds the vocabulary, the train and validation token tensors and a fingerprint of the
text, so that a sweep can record exactly which data its perplexities were measured on.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from microsweep.errors import DataError

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

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DATA_ENV = "MICROSWEEP_DATA"
"""A folder holding corpora laid out as ``tinyshakespeare/input.txt`` and so on."""
DATA_LOCATION_FILE = "data-location"
"""In the cache: the last ``$MICROSWEEP_DATA`` a corpus was read from, used when the variable
is not set (so `count`, `export` and `resume` after a `make demo` find the same data)."""


def data_root() -> Path | None:
    """The folder corpora are looked up in: ``$MICROSWEEP_DATA``, else the folder it named the
    last time a corpus was read through it (remembered in the cache), else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    try:
        remembered = (cache_dir() / DATA_LOCATION_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(remembered) if remembered and Path(remembered).is_dir() else None


def _remember_root() -> None:
    """Note ``$MICROSWEEP_DATA`` in the cache after a corpus was read through it (best effort:
    a read-only cache only means the variable is needed next time)."""
    env = os.environ.get(DATA_ENV)
    if not env:
        return
    where = str(Path(env).resolve())
    path = cache_dir() / DATA_LOCATION_FILE
    try:
        if path.is_file() and path.read_text(encoding="utf-8").strip() == where:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        tmp.write_text(where + "\n", encoding="utf-8")
        tmp.replace(path)
    except (OSError, UnicodeDecodeError):
        pass


def cache_dir() -> Path:
    """Where downloads and pretrained models are kept: ``$MICROSWEEP_CACHE`` or ~/.cache."""
    root = os.environ.get("MICROSWEEP_CACHE") or Path.home() / ".cache" / "microsweep"
    return Path(root)


@dataclass
class Corpus:
    """A tokenized corpus with fixed splits; `vocab[i]` is the string of token id i."""

    name: str
    vocab: list[str]
    train: torch.Tensor
    val: torch.Tensor
    level: str = "char"
    fingerprint: str = ""
    source: str = ""
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        if not self._index:
            self._index = {s: i for i, s in enumerate(self.vocab)}
        units = list(text) if self.level == "char" else text.split()
        unk = self._index.get("<unk>") if self.level == "word" else None
        try:
            return torch.tensor(
                [self._index[u] if unk is None else self._index.get(u, unk) for u in units],
                dtype=torch.long,
            )
        except KeyError as exc:
            raise DataError(f"{exc.args[0]!r} is not in the {self.name} vocabulary") from None

    def decode(self, ids: torch.Tensor) -> str:
        sep = "" if self.level == "char" else " "
        return sep.join(self.vocab[i] for i in ids.tolist())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"corpus file {path} does not exist; pass an existing path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read corpus file {path}: {exc}") from None


def text_file(
    path: str | os.PathLike[str],
    *,
    level: str = "char",
    val_fraction: float = 0.1,
    name: str | None = None,
) -> Corpus:
    """Tokenize a text file at character or word level; the last `val_fraction` is validation."""
    if level not in ("char", "word"):
        raise DataError(f"level {level!r} is not 'char' or 'word'")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction!r} must be between 0 and 1")
    path = Path(path)
    text = _read(path)
    units = list(text) if level == "char" else text.split()
    if len(units) < 100:
        raise DataError(f"corpus file {path} has only {len(units)} tokens; it needs at least 100")
    vocab = sorted(set(units))
    index = {s: i for i, s in enumerate(vocab)}
    ids = torch.tensor([index[u] for u in units], dtype=torch.long)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return Corpus(
        name=name or path.stem,
        vocab=vocab,
        train=ids[:n_train],
        val=ids[n_train:],
        level=level,
        fingerprint=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        source=str(path),
        _index=index,
    )


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            out.write(response.read())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({exc}); pass path= or set {DATA_ENV} to a folder "
            "holding tinyshakespeare/input.txt"
        ) from None
    tmp.replace(dest)


def tiny_shakespeare(path: str | os.PathLike[str] | None = None) -> Corpus:
    """Tiny Shakespeare at character level, split 90/10 into train and validation.

    Looked up in order: `path`, ``$MICROSWEEP_DATA/tinyshakespeare/input.txt`` (or the folder
    that variable last named, see `data_root`), the cache, and finally a download into the
    cache.
    """
    if path is not None:
        return text_file(path, level="char", name="tinyshakespeare")
    env = os.environ.get(DATA_ENV)
    root = data_root()
    if root is not None:
        candidate = root / "tinyshakespeare" / "input.txt"
        if env and not candidate.is_file():
            raise DataError(f"{DATA_ENV}={env} has no tinyshakespeare/input.txt")
        if candidate.is_file():
            corpus = text_file(candidate, level="char", name="tinyshakespeare")
            _remember_root()
            return corpus
    cached = cache_dir() / "data" / "tinyshakespeare" / "input.txt"
    if not cached.is_file():
        _download(TINY_SHAKESPEARE_URL, cached)
    return text_file(cached, level="char", name="tinyshakespeare")


EOS = "<eos>"
UNK = "<unk>"


def _words(text: str) -> list[str]:
    """Whitespace-split words with an end-of-sentence token closing every line."""
    out: list[str] = []
    for line in text.splitlines():
        out.extend(line.split())
        out.append(EOS)
    return out


def _split_file(folder: Path, split: str) -> Path:
    """``{split}.txt``, or WikiText's own ``wiki.{split}.tokens`` when only that exists."""
    plain = folder / f"{split}.txt"
    wiki = folder / f"wiki.{split}.tokens"
    return wiki if not plain.is_file() and wiki.is_file() else plain


def word_corpus(
    path: str | os.PathLike[str],
    *,
    train: str = "train",
    val: str = "valid",
    name: str | None = None,
) -> Corpus:
    """A word-level corpus from a folder of split files (``{train}.txt``, ``{val}.txt``), laid
    out as WikiText-2/103 and PTB are: words split on whitespace, ``<eos>`` closing every line,
    the vocabulary built from the training split (plus ``<unk>``), unknown words as ``<unk>``.

    Pick the splits by name, e.g. ``train="valid", val="test"`` where no training split exists.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"corpus folder {folder} does not exist; pass a folder of split files")
    if train == val:
        raise DataError(f"train and val are both {train!r}; evaluate on a split not trained on")
    texts = {split: _read(_split_file(folder, split)) for split in (train, val)}
    train_words, val_words = _words(texts[train]), _words(texts[val])
    for split, words in ((train, train_words), (val, val_words)):
        if len(words) < 100:
            raise DataError(f"{_split_file(folder, split)} has only {len(words)} tokens")
    vocab = sorted(set(train_words) | {UNK, EOS})
    index = {s: i for i, s in enumerate(vocab)}
    unk = index[UNK]
    digest = hashlib.sha256()
    for split in (train, val):
        digest.update(f"{split}\0".encode())
        digest.update(texts[split].encode("utf-8"))
    return Corpus(
        name=name or folder.name,
        vocab=vocab,
        train=torch.tensor([index[w] for w in train_words], dtype=torch.long),
        val=torch.tensor([index.get(w, unk) for w in val_words], dtype=torch.long),
        level="word",
        fingerprint=digest.hexdigest()[:16],
        source=f"{folder} ({train} / {val})",
        _index=index,
    )


def _named_word_corpus(
    name: str,
    folder: str,
    path: str | os.PathLike[str] | None,
    train: str,
    val: str,
    title: str,
) -> Corpus:
    """A word-level corpus from `path`, else ``$MICROSWEEP_DATA/<folder>`` (or the folder that
    variable last named, see `data_root`), else the cache's ``data/<folder>``."""
    through_env = False
    if path is None:
        root = data_root()
        if root is not None and (root / folder).is_dir():
            path, through_env = root / folder, True
        elif os.environ.get(DATA_ENV):
            path = Path(os.environ[DATA_ENV]) / folder
        else:
            path = cache_dir() / "data" / folder
    if not Path(path).is_dir():
        raise DataError(
            f"no {title} folder at {path}; pass path= or set {DATA_ENV} to a folder holding "
            f"{folder}/{{train,valid,test}}.txt"
        )
    corpus = word_corpus(path, train=train, val=val, name=name)
    if through_env:
        _remember_root()
    return corpus


def ptb(
    path: str | os.PathLike[str] | None = None, *, train: str = "train", val: str = "valid"
) -> Corpus:
    """The Penn Treebank (Mikolov's word-level files ``train.txt``, ``valid.txt``,
    ``test.txt``) from `path`, else ``$MICROSWEEP_DATA/ptb``, else the cache's ``data/ptb``."""
    return _named_word_corpus("ptb", "ptb", path, train, val, "PTB")


def wikitext2(
    path: str | os.PathLike[str] | None = None, *, train: str = "train", val: str = "valid"
) -> Corpus:
    """WikiText-2 (word level, its own ``<unk>``) from `path`, else
    ``$MICROSWEEP_DATA/wikitext-2``, else the cache's ``data/wikitext-2``; split files named
    ``{split}.txt`` or, as distributed, ``wiki.{split}.tokens``."""
    return _named_word_corpus("wikitext-2", "wikitext-2", path, train, val, "WikiText-2")


def wikitext103(
    path: str | os.PathLike[str] | None = None, *, train: str = "train", val: str = "valid"
) -> Corpus:
    """WikiText-103 (the MicroNet challenge's corpus), laid out as `wikitext2` reads it, from
    `path`, else ``$MICROSWEEP_DATA/wikitext-103``, else the cache's ``data/wikitext-103``."""
    return _named_word_corpus("wikitext-103", "wikitext-103", path, train, val, "WikiText-103")
