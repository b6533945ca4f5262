"""Token streams: `prepare_data` (train/val splits of `data.dataset`) and `tokenize_file_for_eval`.

`prepare_data` resolves the source, splits it, builds the tokenizer and tokenizes every split once
into the token cache; `TokenDataset` then views a split as one long memory-mapped token stream
(documents joined by EOS), which `BatchSampler` cuts into batches.

Unusable data -- a missing path, no text, a split too small, a malformed JSON line, no
`data.text_field` column, a hub name with the hub out of reach -- raises `moe.errors.DataError`
with one line naming the file, line, column or dataset, before anything is written to the cache
(`prepare_data`'s and `tokenize_file_for_eval`'s checks run before the build).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from moe.data.cache import _build_once, _hash_key, _slug, _SplitWriter, _write_json, read_index
from moe.data.corpus import _Corpus
from moe.data.prepared import TOKENIZER_DIR, check_tokenizer, is_prepared, read_manifest, shard_prefixes
from moe.data.sources import _check_readable, _resolve_source
from moe.data.tokenizers import Tokenizer, _tokenizer_spec, build_tokenizer, load_saved_tokenizer
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations
    from moe.config import DataConfig

logger = logging.getLogger(__name__)

# Above this much raw text, a multi-process run refuses to tokenize in-line (`_refuse_large_corpus`):
# at ~5-20 MB/s for one process that is a wait of half a minute or more for every other rank.
PREPARE_THRESHOLD_BYTES = 256 << 20

# How many documents are tokenized per call: big enough for `tokenizers`' batch parallelism.
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_BYTES = 8 << 20


class TokenDataset:
    """One split as a single memory-mapped token stream: documents joined by (ending in) EOS.

    Sequence i of length S is the window tokens[i*S : i*S + S + 1]: S inputs plus the S targets
    shifted by one. Windows do not overlap (apart from that one shared boundary token) and may span
    documents, as in GPT pretraining.
    """

    def __init__(self, path_prefix: Union[str, Sequence[str]], name: str = "") -> None:
        prefixes = [path_prefix] if isinstance(path_prefix, str) else list(path_prefix)
        self.path_prefix = prefixes[0] if len(prefixes) == 1 else os.path.dirname(os.path.dirname(prefixes[0]))
        self.name = name or self.path_prefix
        """What the tokens came from, for error messages (`data.dataset='x' (train split)`)."""
        parts, self.num_documents = [], 0
        for prefix in prefixes:  # several: the shards of a prepared folder, one stream in their order
            tokens, docs = _open_tokens(prefix)
            self.num_documents += docs
            if tokens.shape[0]:
                parts.append(tokens)
        self.tokens = parts[0] if len(parts) == 1 else _Concat(parts) if parts else np.zeros(0, dtype=np.uint16)
        self.num_tokens = int(self.tokens.shape[0])

    def num_sequences(self, seq_len: int) -> int:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def sequence(self, i: int, seq_len: int) -> np.ndarray:
        n = self.num_sequences(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range: {n} sequences of length {seq_len}")
        start = i * seq_len
        return np.array(self.tokens[start:start + seq_len + 1], dtype=np.int64)  # a copy, plain ndarray

    def sequences(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """int64 [len(indices), seq_len + 1]; one gather from the memory map instead of a loop."""
        indices = np.asarray(indices, dtype=np.int64)
        n = self.num_sequences(seq_len)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"sequence index out of range: {n} sequences of length {seq_len}")
        offsets = indices[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        return np.array(self.tokens[offsets], dtype=np.int64)

    def __repr__(self) -> str:
        return f"TokenDataset({self.path_prefix!r}, num_tokens={self.num_tokens}, num_documents={self.num_documents})"


def _open_tokens(path_prefix: str) -> Tuple[np.ndarray, int]:
    """(the token stream of one .bin/.idx pair as a read-only memmap, its number of documents)."""
    bin_path = path_prefix + ".bin"
    if os.path.getsize(bin_path) == 0:
        # numpy cannot memory-map an empty file; an empty split is legal (and reported later by
        # BatchSampler with a clear message).
        return np.zeros(0, dtype=np.uint16), 0
    # the documents lie back to back in the .bin file: the stream is one flat memmap of it (numpy's
    # memmap stays open for as long as any view of it exists)
    dtype, docs, total = read_index(path_prefix)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,)), docs


class _Concat:
    """Several token streams read as one: the indexing TokenDataset uses (slices, integer arrays)."""

    def __init__(self, parts: List[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
        self.shape = (int(self.starts[-1]),)
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            key = np.arange(start, stop, step, dtype=np.int64)
        flat = np.asarray(key, dtype=np.int64)
        out = np.empty(flat.shape, dtype=self.dtype)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        for part in np.unique(which):
            mask = which == part
            out[mask] = self.parts[part][flat[mask] - self.starts[part]]
        return out


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: TokenDataset
    val: TokenDataset
    cache_path: str = ""
    """The cache folder the splits were read from (for logs)."""
    sources: list = field(default_factory=list)
    """A mixture's `moe.data.mixture.SourceData`, one per `data.sources` entry (train/val are then the first's)."""


def prepare_data(cfg: DataConfig, is_writer: bool = True, barrier: Optional[Callable[[], None]] = None,
                 seq_len: int = 0, batch_sequences: int = 1, world_size: int = 1) -> TokenData:
    """Tokenizer plus memory-mapped train/val token streams for `cfg`, tokenizing only on a cache miss.

    With several processes, exactly one per cache (rank 0) passes `is_writer=True`. `barrier` is
    called exactly once by every process -- by the writer after building, by the others before
    reading -- so it must be a collective such as `torch.distributed.barrier`. Independent runs
    sharing a cache_dir (a dense and an MoE run started together) are serialised by a file lock:
    the second one waits and then reuses what the first built.

    Unusable data (missing, empty, a bad record, no text column, an offline hub) raises DataError
    before anything is written to `cfg.cache_dir`. With `seq_len` (train.seq_len), a split with
    fewer than `batch_sequences` (micro_batch_size x data-parallel size) sequences is a DataError
    too, here rather than at the first evaluation.

    A folder written by `moe data prepare` is read in place by every process, with no barrier and no
    writes (`_open_prepared`). With `world_size` > 1, a corpus larger than `PREPARE_THRESHOLD_BYTES`
    that is neither prepared nor cached is a DataError telling the user to run `moe data prepare`:
    the other processes would wait in `barrier` for as long as rank 0 tokenizes.
    """
    if is_prepared(cfg.dataset):
        data = _open_prepared(cfg)
        if seq_len > 0:
            _check_fits(data, seq_len, max(1, batch_sequences), cfg.max_bytes)
        return data
    corpus = _Corpus(_resolve_source(cfg.dataset, cfg.dataset_config, cfg.text_field), cfg.max_bytes,
                     cfg.val_fraction)
    key = _hash_key({"kind": "tokens", "corpus": corpus.key(), "tokenizer": _tokenizer_spec(cfg)})
    tok_name = "bpe" if cfg.tokenizer == "bpe" else _slug(os.path.basename(cfg.tokenizer.rstrip("/")))
    final = os.path.join(cfg.cache_dir, "tokens", f"{corpus.source.slug}-{tok_name}-{key}")
    pretrained = None
    if world_size > 1 and not os.path.isdir(final):
        _refuse_large_corpus(cfg, corpus.source, world_size)
    if not os.path.isdir(final):
        # Every rank checks local data, so that most bad files stop them all with the same message
        # instead of leaving the others in the barrier. Only the writer reads JSON to the end (a
        # pass per rank would multiply the I/O), loads a hub dataset, or a pretrained tokenizer.
        if is_writer or corpus.source.kind != "hub":
            corpus.check(full=is_writer)
        if is_writer and cfg.tokenizer not in ("bytes", "bpe"):
            pretrained = build_tokenizer(cfg)

    def build(tmp_dir: str) -> None:
        t0 = time.perf_counter()
        tokenizer = pretrained or build_tokenizer(cfg, train_texts=corpus.train_texts)
        tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
        with _SplitWriter(os.path.join(tmp_dir, "train"), tokenizer) as train, \
                _SplitWriter(os.path.join(tmp_dir, "val"), tokenizer) as val:
            for texts, flags in _batched(corpus.pieces()):
                for ids, is_val in zip(tokenizer.encode_arrays(texts), flags):
                    (val if is_val else train).add(ids)
        seconds = time.perf_counter() - t0
        _write_json(os.path.join(tmp_dir, "meta.json"), {
            "key": corpus.key(), "tokenizer": _tokenizer_spec(cfg), "split_plan": corpus.plan(),
            "train": train.stats(), "val": val.stats(), "build_seconds": round(seconds, 3)})
        logger.info("tokenized %s: %d train / %d val tokens in %.1f s -> %s", cfg.dataset,
                    train.num_tokens, val.num_tokens, seconds, final)

    _build_once(final, build, is_writer=is_writer)
    if barrier is not None:
        barrier()
    if not os.path.isdir(final):
        raise RuntimeError(f"token cache {final} does not exist after the barrier: the writer rank should have "
                           f"built it; do all ranks see the same data.cache_dir ({cfg.cache_dir})?")
    where = corpus.source.describe()
    data = TokenData(tokenizer=load_saved_tokenizer(os.path.join(final, "tokenizer")),
                     train=TokenDataset(os.path.join(final, "train"), f"{where} (train split)"),
                     val=TokenDataset(os.path.join(final, "val"), f"{where} (validation split)"),
                     cache_path=final)
    if seq_len > 0:
        _check_fits(data, seq_len, max(1, batch_sequences), cfg.max_bytes)
    return data


def _open_prepared(cfg: DataConfig) -> TokenData:
    """The train/val streams of a prepared folder, after checking it was made with cfg's tokenizer."""
    manifest = read_manifest(cfg.dataset)
    check_tokenizer(cfg, cfg.dataset, manifest)
    where = f"data.dataset={cfg.dataset!r} (prepared)"
    folder = os.path.abspath(os.path.expanduser(cfg.dataset))
    return TokenData(tokenizer=load_saved_tokenizer(os.path.join(folder, TOKENIZER_DIR)),
                     train=TokenDataset(shard_prefixes(folder, manifest, "train"), f"{where} (train split)"),
                     val=TokenDataset(shard_prefixes(folder, manifest, "val"), f"{where} (validation split)"),
                     cache_path=folder)


def _refuse_large_corpus(cfg: DataConfig, source, world_size: int) -> None:
    """DataError for a multi-process run about to tokenize more than PREPARE_THRESHOLD_BYTES on rank 0.

    The size is the corpus files' (capped by data.max_bytes), known without reading them; a hub
    dataset's size is not, so only a data.max_bytes above the threshold counts there.
    """
    size = sum(entry[1] for entry in source.fingerprint.get("files", []))
    if source.kind == "hub":
        size = cfg.max_bytes
    elif cfg.max_bytes > 0:
        size = min(size, cfg.max_bytes)
    if size > PREPARE_THRESHOLD_BYTES:
        raise DataError(
            f"{source.describe()}: {size / 2**20:.0f} MiB of text is not tokenized yet, and a {world_size}-process "
            f"run would wait while rank 0 tokenizes it (more than {PREPARE_THRESHOLD_BYTES >> 20} MiB); tokenize "
            f"it first with `moe data prepare CONFIG --workers N` and train with data.dataset=<the prepared "
            f"folder>, or run one process once to fill data.cache_dir")


def _check_fits(data: TokenData, seq_len: int, batch_sequences: int, max_bytes: int) -> None:
    """Each split must give one batch of sequences (seq_len inputs plus the shifted target each)."""
    more = "more text" + (f" (a larger data.max_bytes than {max_bytes})" if max_bytes > 0 else "")
    for ds, fraction in ((data.train, "smaller"), (data.val, "larger")):
        n = ds.num_sequences(seq_len)
        if n < batch_sequences:
            raise DataError(f"{ds.name}: {ds.num_tokens} tokens make {n} sequence(s) of train.seq_len={seq_len}, "
                            f"fewer than the {batch_sequences} of one batch; use {more}, a smaller "
                            f"train.seq_len or a {fraction} data.val_fraction")


def tokenize_file_for_eval(path: str, tokenizer: Tokenizer, cache_dir: str, text_field: str = "text",
                           dataset_config: Optional[str] = None) -> TokenDataset:
    """All of `path` (a local text/json/jsonl/parquet file or folder, or a hub dataset) as one
    TokenDataset, cached like training data. No max_bytes and no train/val split: every document
    counts. For a hub dataset, its validation split is used when it has one (else test, else train).
    """
    source = _resolve_source(path, dataset_config, text_field, hub_splits=("validation", "test", "train"),
                             label="evaluation data")
    key = _hash_key({"kind": "eval", "source": source.fingerprint, "tokenizer": tokenizer.fingerprint()})
    final = os.path.join(cache_dir, "eval", f"{source.slug}-{key}")
    if not os.path.isdir(final):
        _check_readable(source, source.documents())  # before anything is written to cache_dir

    def build(tmp_dir: str) -> None:
        with _SplitWriter(os.path.join(tmp_dir, "all"), tokenizer) as out:
            for texts, _ in _batched((doc, False) for doc in source.documents()):
                for ids in tokenizer.encode_arrays(texts):
                    out.add(ids)
        _write_json(os.path.join(tmp_dir, "meta.json"), {"source": source.fingerprint, "all": out.stats()})

    _build_once(final, build, is_writer=True)
    return TokenDataset(os.path.join(final, "all"), source.describe())


def _batched(pieces: Iterable[Tuple[str, bool]]) -> Iterator[Tuple[List[str], List[bool]]]:
    texts: List[str] = []
    flags: List[bool] = []
    size = 0
    for text, flag in pieces:
        texts.append(text)
        flags.append(flag)
        size += len(text)
        if len(texts) >= _ENCODE_BATCH_DOCS or size >= _ENCODE_BATCH_BYTES:
            yield texts, flags
            texts, flags, size = [], [], 0
    if texts:
        yield texts, flags
