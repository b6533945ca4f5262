"""The split: a source's documents after `data.max_bytes`, each sent to train or validation by hash.

Each document goes to validation when a hash of its text falls below `data.val_fraction`. Hashing
the text (not the position) keeps the split stable when documents are added, removed or
reordered, and sends exact duplicates to the same side. (Tiny corpora get a fallback so neither
side is empty; see `_Corpus`.)
"""
from __future__ import annotations

import hashlib
import logging
from typing import Iterator, Optional, Tuple

from moe.data.sources import _ByteBudget, _check_readable, _no_documents, _Source, _utf8
from moe.errors import DataError

logger = logging.getLogger(__name__)


class _Corpus:
    """A source's documents after `max_bytes`, and their deterministic train/val split.

    A document goes to validation when the hash of its text (a number in [0, 1)) is below
    `val_fraction`. Small corpora can leave one side empty by chance; then the single document with
    the most extreme hash (the lowest for an empty validation side) is moved across. A corpus of one
    document (a single text file) is instead cut in two: its first (1 - val_fraction) goes to train,
    the rest to validation. All of this depends only on the documents, so every pass over the corpus
    (BPE training, tokenization, other processes) makes the same split.
    """

    def __init__(self, source: _Source, max_bytes: int, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.source = source
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self._plan: Optional[Tuple[str, int]] = None

    def key(self) -> dict:
        return {"source": self.source.fingerprint, "max_bytes": self.max_bytes, "val_fraction": self.val_fraction}

    def documents(self) -> Iterator[str]:
        return self.source.documents(_ByteBudget(self.max_bytes))

    def check(self, full: bool = True) -> None:
        """Raise DataError now for whatever would fail the build or leave a split empty, so that it
        fails before anything is written to the cache (`full`: see `_check_readable`)."""
        _check_readable(self.source, self.documents(), full)
        self.plan()

    def plan(self) -> Tuple[str, int]:
        """("hash", -1), ("hash", i) when document i is moved to the empty side, or ("cut", -1)."""
        if self._plan is None:
            seen_val = seen_train = False
            lowest = (2.0, -1)  # (hash, document index)
            highest = (-1.0, -1)
            count, first = 0, ""
            for i, doc in enumerate(self.documents()):
                h = _doc_hash(doc)
                seen_val |= h < self.val_fraction
                seen_train |= h >= self.val_fraction
                if seen_val and seen_train:
                    break  # the common case: a real corpus stops here after a few dozen documents
                lowest, highest = min(lowest, (h, i)), max(highest, (h, i))
                if count == 0:
                    first = doc  # a lone document must be long enough to cut in two
                count += 1
            if seen_val and seen_train:
                self._plan = ("hash", -1)
            elif count == 0:
                raise _no_documents(self.source)
            elif count == 1:
                self._plan = ("cut", -1)
                if not _cut(first, 1.0 - self.val_fraction)[0]:
                    raise DataError(f"{self.source.describe()}: a single document of {len(_utf8(first))} byte(s) "
                                    f"cannot be split into train and validation text; use more text")
                logger.warning("data.dataset=%r is a single document: holding out its last %.1f%% for validation",
                               self.source.spec, 100 * self.val_fraction)
            else:
                self._plan = ("hash", lowest[1] if not seen_val else highest[1])
        return self._plan

    def pieces(self) -> Iterator[Tuple[str, bool]]:
        """(text, is_val) for every piece of every document, in corpus order."""
        mode, flipped = self.plan()
        for i, doc in enumerate(self.documents()):
            if mode == "cut":
                head, tail = _cut(doc, 1.0 - self.val_fraction)
                if head:
                    yield head, False
                if tail:
                    yield tail, True
            else:
                is_val = _doc_hash(doc) < self.val_fraction
                yield doc, (not is_val if i == flipped else is_val)

    def train_texts(self) -> Iterator[str]:
        return (text for text, is_val in self.pieces() if not is_val)


def _doc_hash(text: str) -> float:
    """A uniform number in [0, 1) from the document's bytes: the same text always lands on the same side."""
    digest = hashlib.blake2b(_utf8(text), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _cut(text: str, fraction: float) -> Tuple[str, str]:
    """Split at `fraction` of the text, moved forward to just after a newline when there is one."""
    at = int(len(text) * fraction)
    newline = text.find("\n", at)
    if newline != -1 and newline + 1 < len(text):
        at = newline + 1
    return text[:at], text[at:]
