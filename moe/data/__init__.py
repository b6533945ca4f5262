"""Raw text -> tokenizer -> cached token files -> deterministic per-rank batches.

The path of data through the package, in the order a training run meets it:

- `sources`: what `data.dataset` names (embedded corpus, local file or folder, hub dataset), read as
  documents no further than `data.max_bytes`; `check_config` checks the `data` section up front.
- `formats`: local plain text, JSON lines, JSON and parquet files as documents.
- `hub`: Hugging Face hub datasets, and failing fast when the hub is out of reach.
- `corpus`: the deterministic train/val split of the documents, by a hash of each one's text.
- `tokenizers`: `bytes`, a byte-level BPE trained once on the train split, or a pretrained tokenizer.
- `cache`: the on-disk token cache (megatron-core `.bin` + `.idx`), keyed by a hash and built once.
- `dataset`: `prepare_data` and `tokenize_file_for_eval`, giving memory-mapped `TokenDataset`s.
- `sampler`: `BatchSampler`, fixed-length windows dealt to data-parallel ranks, resumable.
- `mixture`: `data.sources` blended by weight (`MixtureSampler`), one entry point for training data
  (`prepare_training_data`) and its sampler (`make_sampler`).
- `prepare` / `prepared`: `moe data prepare` (tokenizing with N workers into a prepared folder) and
  reading such a folder in a run.

Heavy libraries (megatron-core, `datasets`, `tokenizers`, pyarrow, torch) are imported inside the
functions that need them: a config check imports this package (for `check_config` and
`EMBEDDED_CORPORA`), and it should not pay several seconds of imports.
"""
from moe.data.cache import token_dtype
from moe.data.dataset import TokenData, TokenDataset, prepare_data, tokenize_file_for_eval
from moe.data.mixture import MixtureSampler, make_sampler, prepare_training_data
from moe.data.sampler import BatchSampler
from moe.data.sources import EMBEDDED_CORPORA, DataFileNotFound, check_config
from moe.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, load_saved_tokenizer

__all__ = [
    "EMBEDDED_CORPORA", "BatchSampler", "MixtureSampler", "make_sampler", "prepare_training_data", "ByteTokenizer",
    "DataFileNotFound", "HFTokenizer", "TokenData",
    "TokenDataset", "Tokenizer", "build_tokenizer", "check_config", "load_saved_tokenizer", "prepare_data",
    "token_dtype", "tokenize_file_for_eval",
]
