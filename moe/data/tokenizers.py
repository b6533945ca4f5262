"""Tokenizers: `bytes`, a byte-level BPE trained on the train split, or a pretrained one.

`bytes` needs no training (vocab 257), `bpe` is a byte-level BPE trained once on the train split
and cached, anything else is a pretrained `tokenizers` file, a folder holding tokenizer.json, or a
hub name. Every tokenizer saves to and loads from a folder (`Tokenizer.save`,
`load_saved_tokenizer`), which is how the token cache keeps the tokenizer its tokens were made with.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional

import numpy as np

from moe.data.cache import _build_once, _hash_key, _write_json
from moe.data.corpus import _Corpus
from moe.data.formats import _one_line
from moe.data.hub import _hub_offline, _hub_unreachable
from moe.data.sources import DataFileNotFound, _looks_like_path, _resolve_source, _utf8
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations
    from moe.config import DataConfig

logger = logging.getLogger(__name__)

# End-of-text names pretrained tokenizers use; the first one present becomes `eos_id`.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BPE_EOS = "<|endoftext|>"

_META_FILE = "moe_tokenizer.json"


class Tokenizer:
    """Common interface of every tokenizer the models train with.

    `vocab_size` bounds every id `encode` can return (the embedding table size), `eos_id` is the token
    appended after every document in the token stream.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    # ---- not part of the minimal interface; used by the pipeline for speed and cache keys

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        """Encode several documents at once (implementations override this for speed)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def fingerprint(self) -> str:
        """A string that changes whenever the text -> ids mapping changes (part of cache keys)."""
        raise NotImplementedError

    def _write_meta(self, directory: str, kind: str) -> None:
        # Says which class to rebuild and keeps name/eos_id, which a tokenizer.json alone lacks.
        _write_json(os.path.join(directory, _META_FILE),
                    {"kind": kind, "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens (ids 0-255); id 256 is EOS. Needs no training and no files."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(_utf8(text))

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        # frombuffer is a zero-copy view of the encoded bytes: this is what keeps tokenizing the
        # embedded corpus well under a second (a per-character Python loop would take ~10 s).
        return [np.frombuffer(_utf8(t), dtype=np.uint8) for t in texts]

    def decode(self, ids: List[int]) -> str:
        # Generated ids can be anything (EOS, half of a multi-byte character): drop non-bytes and
        # let the decoder replace invalid sequences instead of raising mid-generation.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        # Not a `tokenizers` file (nothing to describe but the scheme); the meta file says so.
        _write_json(os.path.join(directory, "tokenizer.json"),
                    {"type": "moe-bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id})
        self._write_meta(directory, "bytes")

    def fingerprint(self) -> str:
        return "bytes-v1"


class HFTokenizer(Tokenizer):
    """Wraps a Hugging Face `tokenizers.Tokenizer` (our trained BPE or a pretrained one).

    Documents are encoded without the tokenizer's own special tokens (BOS, post-processor
    templates): the pipeline marks document ends with `eos_id` itself.
    """

    def __init__(self, tok, name: str, eos_id: Optional[int] = None) -> None:
        self._tok = tok
        self.name = name
        if eos_id is None:
            eos_id = _find_or_add_eos(tok)
        self.eos_id = int(eos_id)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), self.eos_id + 1)

    @property
    def hf_tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: List[str]) -> List[np.ndarray]:
        # encode_batch runs in Rust threads; much faster than one call per document.
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: List[int]) -> str:
        # Out-of-range ids are dropped rather than raising (the model's vocab may be padded past
        # the tokenizer's); the byte-level decoder already replaces invalid UTF-8.
        n = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        self._write_meta(directory, "hf")

    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


def load_saved_tokenizer(directory: str) -> Tokenizer:
    """Inverse of `Tokenizer.save`. Also accepts a plain folder holding a `tokenizers` tokenizer.json."""
    meta_path = os.path.join(directory, _META_FILE)
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["kind"] == "bytes":
            return ByteTokenizer()
        from tokenizers import Tokenizer as _HF

        return HFTokenizer(_HF.from_file(tok_path), name=meta["name"], eos_id=meta["eos_id"])
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer as _HF

        return HFTokenizer(_HF.from_file(tok_path), name=os.path.abspath(directory))
    raise DataFileNotFound(f"no saved tokenizer in {directory} (expected {tok_path})")


def build_tokenizer(cfg: DataConfig, train_texts: Optional[Callable[[], Iterable[str]]] = None) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names.

    `bytes` needs nothing. `bpe` is trained on the train split (documents from `train_texts()`,
    which must yield cfg's train split; by default it is read from cfg) and cached under
    `cfg.cache_dir/tokenizers`, so a second call loads it without calling `train_texts`. Anything else
    is a pretrained `tokenizers` file, a folder holding tokenizer.json, or a hub name (online only).
    """
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return _build_bpe(cfg, train_texts)
    return _load_pretrained(cfg.tokenizer)


def _tokenizer_spec(cfg: DataConfig) -> dict:
    """What identifies cfg's tokenizer without building it (so a cache hit needs no training)."""
    if cfg.tokenizer == "bytes":
        return {"kind": "bytes"}
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size}
    path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
    if os.path.exists(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        return {"kind": "local", "path": path,
                "files": [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns]
                          for f in files if os.path.isfile(f)]}
    return {"kind": "hub", "name": cfg.tokenizer}


def _build_bpe(cfg: DataConfig, train_texts: Optional[Callable[[], Iterable[str]]]) -> Tokenizer:
    corpus = _Corpus(_resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field), cfg.max_bytes,
                     cfg.val_fraction)
    key = _hash_key({"kind": "bpe", "corpus": corpus.key(), "vocab_size": cfg.bpe_vocab_size})
    final = os.path.join(cfg.cache_dir, "tokenizers", f"bpe{cfg.bpe_vocab_size}-{corpus.source.slug}-{key}")

    def train(tmp_dir: str) -> None:
        texts = train_texts() if train_texts is not None else corpus.train_texts()
        t0 = time.perf_counter()
        _train_bpe(texts, cfg.bpe_vocab_size).save(tmp_dir)
        logger.info("trained a %d-token BPE tokenizer in %.1f s -> %s", cfg.bpe_vocab_size,
                    time.perf_counter() - t0, final)

    if train_texts is None and not os.path.isdir(final):
        corpus.check()  # prepare_data has checked its corpus already
    _build_once(final, train, is_writer=True)
    return load_saved_tokenizer(final)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # GPT-2 style byte-level BPE: every byte is in the initial alphabet, so any text encodes
    # without unknown tokens, and the byte-level decoder makes decode(encode(x)) == x exactly
    # (no prefix space is added).
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_BPE_EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, name="bpe", eos_id=tok.token_to_id(_BPE_EOS))


def _load_pretrained(spec: str) -> Tokenizer:
    from tokenizers import Tokenizer as _HF

    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return load_saved_tokenizer(path)  # our own saved folder or any folder with tokenizer.json
    if os.path.isfile(path):
        return HFTokenizer(_HF.from_file(path), name=spec)
    if _looks_like_path(spec):
        raise DataFileNotFound(f"data.tokenizer: file not found: {spec}")
    unreachable = _hub_unreachable()
    try:
        # Unreachable: the local Hugging Face cache only, instead of ~25 s of network retries.
        with _hub_offline() if unreachable else contextlib.nullcontext():
            tok = _HF.from_pretrained(spec)
    except Exception as exc:
        reason = f"the hub is unreachable: {unreachable}" if unreachable else f"{type(exc).__name__}: {_one_line(exc)}"
        raise DataError(
            f"data.tokenizer={spec!r}: not a local file or folder, and it could not be loaded from the Hugging "
            f"Face hub ({reason}); hub tokenizers need internet access: offline, use `bytes`, `bpe` or a local "
            f"tokenizer.json path") from exc
    return HFTokenizer(tok, name=spec)


def _find_or_add_eos(tok) -> int:
    for token in _EOS_CANDIDATES:
        tid = tok.token_to_id(token)
        if tid is not None:
            return tid
    # No end-of-text token (some tokenizers only have padding/unknown): add one, so documents
    # can still be separated. It is saved with the tokenizer and so stays stable.
    tok.add_special_tokens([_BPE_EOS])
    return tok.token_to_id(_BPE_EOS)
