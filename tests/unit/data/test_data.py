"""Tests of moe/data/__init__.py: tokenizers, the token cache and the batch sampler (CPU, a few seconds)."""
from __future__ import annotations

import gc
import json
import os
import threading

import numpy as np
import pytest
import torch

from moe import data
from moe.config import DataConfig

# ------------------------------------------------------------------------------------------ helpers

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega naïve café über straße 東京 😀").split()


def make_doc(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, size=10)) for _ in range(n_words // 10)]
    return f"document {i}\n" + "\n".join(lines) + "\n"


def write_text_folder(folder, n_docs: int = 40):
    os.makedirs(folder, exist_ok=True)
    docs = {}
    for i in range(n_docs):
        docs[f"doc{i:03d}.txt"] = make_doc(i)
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(docs[f"doc{i:03d}.txt"])
    with open(os.path.join(folder, "ignored.bin"), "wb") as f:  # unsupported extension: skipped
        f.write(b"\x00\x01 not text")
    return docs


def split_docs(ds: data.TokenDataset, tok: data.Tokenizer) -> list:
    """The documents of a token stream (each ends with EOS)."""
    ids = np.asarray(ds.tokens, dtype=np.int64)
    ends = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def pattern_dataset(tmp_path, n_bytes: int) -> data.TokenDataset:
    """A byte-tokenized dataset whose token k is 33 + k % 90 (known, so windows can be checked)."""
    path = tmp_path / "pattern.txt"
    path.write_bytes(bytes(33 + k % 90 for k in range(n_bytes)))
    return data.tokenize_file_for_eval(str(path), data.ByteTokenizer(), str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_text_folder(root / "docs")
    cfg = DataConfig(dataset=str(root / "docs"), cache_dir=str(root / "cache"), val_fraction=0.2)
    return cfg, docs, data.prepare_data(cfg)


# --------------------------------------------------------------------------------------- tokenizers


def test_bytes_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    text = "hello, wörld! 東京 😀\n\ttabs\r\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    # Anything a model may generate decodes: EOS/out-of-range ids are dropped, half a character
    # becomes U+FFFD.
    assert tok.decode([0xE6, 0x9D, 65, 256, 999, -3]) == "\ufffdA"


def test_bytes_tokenizer_save_load(tmp_path):
    data.ByteTokenizer().save(str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    tok = data.load_saved_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, data.ByteTokenizer) and tok.encode("é") == [0xC3, 0xA9]


def test_bpe_trains_round_trips_and_is_cached(tmp_path):
    write_text_folder(tmp_path / "docs", n_docs=30)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                     bpe_vocab_size=300, val_fraction=0.2)
    calls = []

    def train_texts():
        calls.append(1)
        return (make_doc(i) for i in range(30))

    tok = data.build_tokenizer(cfg, train_texts)
    assert calls == [1]
    assert tok.name == "bpe" and tok.vocab_size == 300 and 0 <= tok.eos_id < 300
    text = "alpha beta 東京 naïve 😀 unseen-word QQQ\n\r\n  spaces  "
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert isinstance(tok.decode([tok.eos_id, 10**6, -1] + ids[:1]), str)  # never raises

    tok_json = next((tmp_path / "cache" / "tokenizers").glob("bpe300-*/tokenizer.json"))
    mtime = tok_json.stat().st_mtime_ns
    again = data.build_tokenizer(cfg, train_texts)  # cache hit: train_texts is not even called
    assert calls == [1] and tok_json.stat().st_mtime_ns == mtime
    assert again.encode(text) == ids

    tok.save(str(tmp_path / "saved"))
    loaded = data.load_saved_tokenizer(str(tmp_path / "saved"))
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == (tok.name, tok.vocab_size, tok.eos_id)
    assert loaded.encode(text) == ids and loaded.decode(ids) == text


def test_pretrained_tokenizer_from_local_file(tmp_path):
    # A plain tokenizers file without an end-of-text token: one is added.
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "wl.json"))
    tok = data.build_tokenizer(DataConfig(tokenizer=str(tmp_path / "wl.json")))
    assert tok.encode("a b") == [0, 1] and tok.eos_id == 3 and tok.vocab_size == 4
    with pytest.raises(FileNotFoundError, match="missing_tok.json"):
        data.build_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing_tok.json")))


# ------------------------------------------------------------------------------------ prepare_data


def test_prepare_data_text_folder(text_corpus):
    cfg, docs, td = text_corpus
    assert isinstance(td.tokenizer, data.ByteTokenizer)
    assert td.train.tokens.dtype == np.uint16
    train_docs, val_docs = split_docs(td.train, td.tokenizer), split_docs(td.val, td.tokenizer)
    # One document per file, in sorted file order within each split, nothing lost or duplicated.
    assert sorted(train_docs + val_docs) == sorted(docs.values())
    assert train_docs == [d for d in docs.values() if d in train_docs]
    assert val_docs and train_docs and not set(train_docs) & set(val_docs)
    total_bytes = sum(len(d.encode()) for d in docs.values())
    assert td.train.num_tokens + td.val.num_tokens == total_bytes + len(docs)  # + one EOS each


def test_split_is_deterministic_by_document_hash(text_corpus, tmp_path):
    cfg, docs, td = text_corpus
    val_docs = set(split_docs(td.val, td.tokenizer))
    # A fresh cache, and the files in another folder with other names: same split, because it
    # depends on each document's text only.
    folder = tmp_path / "renamed"
    folder.mkdir()
    for i, text in enumerate(reversed(list(docs.values()))):
        (folder / f"x{i:03d}.txt").write_text(text, encoding="utf-8")
    td2 = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c2"), val_fraction=0.2))
    assert set(split_docs(td2.val, td2.tokenizer)) == val_docs


def test_cache_hit_does_not_retokenize(text_corpus, monkeypatch):
    cfg, _, td = text_corpus
    mtimes = {p: os.stat(os.path.join(td.cache_path, p)).st_mtime_ns for p in os.listdir(td.cache_path)}

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(data, "build_tokenizer", fail)
    monkeypatch.setattr(data._SplitWriter, "add", fail)
    td2 = data.prepare_data(cfg)
    assert td2.cache_path == td.cache_path
    assert np.array_equal(td2.train.tokens, td.train.tokens) and np.array_equal(td2.val.tokens, td.val.tokens)
    assert mtimes == {p: os.stat(os.path.join(td.cache_path, p)).st_mtime_ns for p in os.listdir(td.cache_path)}


def test_cache_key_changes_with_tokens_settings(text_corpus, tmp_path):
    cfg, docs, td = text_corpus
    other = data.prepare_data(DataConfig(dataset=cfg.dataset, cache_dir=cfg.cache_dir, val_fraction=0.5))
    assert other.cache_path != td.cache_path
    # Editing a file changes its size/mtime and so the key.
    folder = tmp_path / "docs"
    write_text_folder(folder, n_docs=5)
    c = DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    first = data.prepare_data(c)
    with open(folder / "doc000.txt", "a") as f:
        f.write("one more line\n")
    second = data.prepare_data(c)
    assert second.cache_path != first.cache_path
    assert second.train.num_tokens + second.val.num_tokens == first.train.num_tokens + first.val.num_tokens + 14


def test_prepare_data_jsonl(tmp_path):
    rows = [{"id": i, "body": make_doc(i)} for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = DataConfig(dataset=str(path), text_field="body", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    td = data.prepare_data(cfg)
    got = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sorted(got) == sorted(r["body"] for r in rows)

    with pytest.raises(ValueError, match=r"no field 'text'.*available columns: id, body"):
        data.prepare_data(DataConfig(dataset=str(path), cache_dir=str(tmp_path / "cache")))


def test_prepare_data_parquet_in_mixed_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"text": [make_doc(i) for i in range(10)]}), str(folder / "a.parquet"))
    (folder / "b.md").write_text(make_doc(99), encoding="utf-8")
    td = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c"), val_fraction=0.2))
    got = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sorted(got) == sorted([make_doc(i) for i in range(10)] + [make_doc(99)])


def test_missing_dataset_names_the_path(tmp_path):
    for missing in (str(tmp_path / "nope"), str(tmp_path / "nope.jsonl"), "./relative/missing.txt"):
        with pytest.raises(FileNotFoundError, match="missing|nope"):
            data.prepare_data(DataConfig(dataset=missing, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="embedded:nothing"):
        data.prepare_data(DataConfig(dataset="embedded:nothing", cache_dir=str(tmp_path / "cache")))


def test_few_documents_still_give_both_splits(tmp_path):
    # 3 documents at val_fraction 0.02: the hash alone would almost surely leave val empty.
    folder = tmp_path / "three"
    write_text_folder(folder, n_docs=3)
    td = data.prepare_data(DataConfig(dataset=str(folder), cache_dir=str(tmp_path / "c")))
    assert len(split_docs(td.train, td.tokenizer)) == 2 and len(split_docs(td.val, td.tokenizer)) == 1
    # A single file is cut: its head trains, its tail validates.
    one = tmp_path / "one.txt"
    one.write_text("".join(make_doc(i) for i in range(20)), encoding="utf-8")
    td = data.prepare_data(DataConfig(dataset=str(one), cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    head, tail = split_docs(td.train, td.tokenizer), split_docs(td.val, td.tokenizer)
    assert head[0] + tail[0] == one.read_text(encoding="utf-8")
    assert 0.05 < td.val.num_tokens / (td.train.num_tokens + td.val.num_tokens) < 0.15


def test_embedded_stdlib_small(tmp_path):
    cfg = DataConfig(dataset="embedded:stdlib", max_bytes=200_000, cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    td = data.prepare_data(cfg)
    docs = split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)
    assert sum(len(d.encode()) for d in docs) == 200_000  # max_bytes is exact (last file cut)
    assert td.val.num_tokens > 0 and "import" in docs[0] + docs[1]
    files = data._stdlib_files(data.sysconfig.get_paths()["stdlib"])
    rel = [os.path.relpath(p, data.sysconfig.get_paths()["stdlib"]) for p in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for r in rel for part in r.split(os.sep))


def test_concurrent_builds_share_one_cache(tmp_path, monkeypatch):
    """Two runs started together on one cache_dir: one tokenizes, the other waits and reuses it."""
    write_text_folder(tmp_path / "docs", n_docs=10)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    builds = []
    real_build_tokenizer = data.build_tokenizer

    def counting_build_tokenizer(*args, **kwargs):
        builds.append(1)
        return real_build_tokenizer(*args, **kwargs)

    monkeypatch.setattr(data, "build_tokenizer", counting_build_tokenizer)
    results, errors = [], []

    def run():
        try:
            results.append(data.prepare_data(cfg))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and builds == [1]
    assert len({r.cache_path for r in results}) == 1
    assert [p for p in os.listdir(os.path.dirname(results[0].cache_path)) if p.startswith(".tmp")] == []


def test_non_writer_reads_after_barrier(tmp_path):
    write_text_folder(tmp_path / "docs", n_docs=10)
    cfg = DataConfig(dataset=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    barrier = threading.Barrier(2, timeout=60)
    out = {}

    def rank(r):
        out[r] = data.prepare_data(cfg, is_writer=(r == 0), barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # the reader starts first
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(out[0].train.tokens, out[1].train.tokens)

    with pytest.raises(RuntimeError, match="writer rank"):
        data.prepare_data(DataConfig(dataset=cfg.dataset, cache_dir=str(tmp_path / "other")), is_writer=False,
                          barrier=lambda: None)


def test_hub_dataset_via_datasets(tmp_path, monkeypatch):
    """Hub names go to datasets.load_dataset (faked here: no network in tests)."""
    import datasets

    calls = []
    train_docs = [make_doc(i) for i in range(20)]

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train_docs}),
                                     "validation": datasets.Dataset.from_dict({"text": ["held out\n"]})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(dataset="someone/corpus", dataset_config="small", cache_dir=str(tmp_path / "c"), val_fraction=0.2)
    td = data.prepare_data(cfg)
    assert calls[0] == ("someone/corpus", "small")
    # Training reads the hub's train split only, then splits it by document hash.
    assert sorted(split_docs(td.train, td.tokenizer) + split_docs(td.val, td.tokenizer)) == sorted(train_docs)
    # Evaluation on a hub dataset reads its validation split.
    ev = data.tokenize_file_for_eval("someone/corpus", td.tokenizer, str(tmp_path / "c"), dataset_config="small")
    assert td.tokenizer.decode(ev.tokens.tolist()) == "held out\n"

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'other/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"data.dataset='other/corpus'.*internet"):
        data.prepare_data(DataConfig(dataset="other/corpus", cache_dir=str(tmp_path / "c")))


def test_hub_tokenizer_offline_error(monkeypatch):
    import tokenizers

    class Offline:
        @staticmethod
        def from_pretrained(name):
            raise OSError("Name or service not known")

    monkeypatch.setattr(tokenizers, "Tokenizer", Offline)
    with pytest.raises(ValueError, match=r"data.tokenizer='gpt2'.*internet"):
        data.build_tokenizer(DataConfig(tokenizer="gpt2"))


# ------------------------------------------------------------------------------------ TokenDataset


def test_sequence_inputs_and_targets_shift_by_one(tmp_path):
    ds = pattern_dataset(tmp_path, 1000)
    assert ds.num_tokens == 1001  # 1000 bytes + EOS
    assert ds.num_sequences(100) == 10 and ds.num_sequences(1000) == 1 and ds.num_sequences(1001) == 0
    seq = ds.sequence(3, 100)
    assert seq.dtype == np.int64 and seq.shape == (101,)
    assert seq.tolist() == [33 + k % 90 for k in range(300, 401)]
    nxt = ds.sequence(4, 100)
    assert nxt[0] == seq[-1]  # windows are adjacent: the last target is the next window's first input
    assert ds.sequence(9, 100)[-1] == 256  # the final EOS is a target
    with pytest.raises(IndexError):
        ds.sequence(10, 100)


def test_token_stream_outlives_its_dataset(tmp_path):
    # The stream is a numpy memmap kept open by its views: reading it after the TokenDataset is
    # gone must not touch an unmapped file (megatron's own reader closes its map in __del__).
    tokens = pattern_dataset(tmp_path, 1000).tokens
    gc.collect()
    assert int(tokens[-1]) == 256 and int(tokens[:10].sum()) == sum(range(33, 43))


def test_tokenize_file_for_eval(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("héllo eval\n" * 50, encoding="utf-8")
    tok = data.ByteTokenizer()
    ds = data.tokenize_file_for_eval(str(path), tok, str(tmp_path / "cache"))
    assert ds.num_tokens == len(path.read_bytes()) + 1
    assert tok.decode(ds.tokens[:-1].tolist()) == path.read_text(encoding="utf-8")
    again = data.tokenize_file_for_eval(str(path), tok, str(tmp_path / "cache"))
    assert again.path_prefix == ds.path_prefix
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        data.tokenize_file_for_eval(str(tmp_path / "nothere.txt"), tok, str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------- BatchSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def numbered_dataset(tmp_path, n_windows: int, seq_len: int = 32) -> data.TokenDataset:
    """Window i of length seq_len starts with its own number i in 5 digits, so batches can be read back."""
    text = "".join(f"{i:05d}".ljust(seq_len, "-") for i in range(n_windows))
    path = tmp_path / f"numbered{n_windows}x{seq_len}.txt"
    path.write_text(text)
    ds = data.tokenize_file_for_eval(str(path), data.ByteTokenizer(), str(tmp_path / "cache"))
    assert ds.num_sequences(seq_len) == n_windows
    return ds


def window_ids(x: torch.Tensor) -> list:
    return [int(bytes(row[:5].tolist()).decode()) for row in x]


def test_sampler_batches_are_shifted_windows(tmp_path):
    ds = numbered_dataset(tmp_path, 100)
    s = data.BatchSampler(ds, seq_len=32, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y, i in zip(x, y, window_ids(x)):
        window = torch.from_numpy(ds.sequence(i, 32))
        assert torch.equal(row_x, window[:-1]) and torch.equal(row_y, window[1:])


def test_sampler_epoch_covers_every_window_once(tmp_path):
    ds = numbered_dataset(tmp_path, 103)  # 12 chunks of 4 x 2 ranks per epoch; 7 windows skipped
    ranks = [data.BatchSampler(ds, 32, 4, r, 2, seed=1) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 12
    epochs = []
    for _ in range(3):
        seen = [i for _ in range(12) for s in ranks for i in window_ids(s.next_batch()[0])]
        assert len(seen) == len(set(seen)) == 96 and all(0 <= i < 103 for i in seen)
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation every epoch
    assert ranks[0].state_dict()["epoch"] == 2
    # Exactly the permutation of (seed, epoch): a new sampler at epoch 1 replays it.
    again = [data.BatchSampler(ds, 32, 4, r, 2, seed=1) for r in (0, 1)]
    for s in again:
        s.load_state_dict({"epoch": 1, "position": 0})
    assert [i for _ in range(12) for s in again for i in window_ids(s.next_batch()[0])] == epochs[1]


def test_sampler_unshuffled_is_in_order(tmp_path):
    ds = pattern_dataset(tmp_path, 2000)
    s = data.BatchSampler(ds, 10, 3, 1, 2, seed=0, shuffle=False)
    x, y = s.next_batch()
    expected = ds.sequences(np.array([3, 4, 5]), 10)
    assert torch.equal(x, torch.from_numpy(expected[:, :-1])) and torch.equal(y, torch.from_numpy(expected[:, 1:]))


def test_sampler_deterministic_across_instances(tmp_path):
    ds = numbered_dataset(tmp_path, 199, seq_len=20)
    a = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=5), 30)
    b = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=5), 30)
    c = take(data.BatchSampler(ds, 20, 4, 1, 3, seed=6), 30)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


def test_sampler_resume_mid_epoch(tmp_path):
    ds = numbered_dataset(tmp_path, 199, seq_len=20)  # 16 chunks of 12 per epoch
    straight = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    expected = take(straight, 40)
    first = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # goes through a JSON checkpoint
    resumed = data.BatchSampler(ds, 20, 6, 0, 2, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(take(resumed, 27), expected[13:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # The position counts global sequences, so the same state also resumes a dp_size=1 layout.
    single = data.BatchSampler(ds, 20, 12, 0, 1, seed=3)
    single.load_state_dict(state)
    x, _ = single.next_batch()
    assert torch.equal(x[:6], expected[13][0])
    with pytest.raises(ValueError, match="seed"):
        data.BatchSampler(ds, 20, 6, 0, 2, seed=4).load_state_dict(state)


def test_sampler_too_small_dataset(tmp_path):
    ds = pattern_dataset(tmp_path, 100)  # 101 tokens -> 3 windows of 32
    with pytest.raises(ValueError, match=r"101 tokens.*3 sequences.*seq_len 32.*micro_batch_size 2.*2 = 4"):
        data.BatchSampler(ds, 32, 2, 0, 2, seed=0)
    data.BatchSampler(ds, 32, 3, 0, 1, seed=0)  # exactly one chunk is enough
