"""Unusable data is a one-line `DataError` naming the file, line, column or dataset, raised before
anything is written to data.cache_dir (moe/data/__init__.py; CPU, in-process, a few seconds, no network)."""
from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import pytest

from moe import data
from moe.config import DataConfig
from moe.errors import DataError, MoeError


def text_of(i: int) -> str:
    return f"document {i}: " + " ".join(f"word{(i * 7 + k) % 31}" for k in range(40)) + "\n"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cfg_for(tmp_path, dataset, **kw) -> DataConfig:
    return DataConfig(dataset=str(dataset), cache_dir=str(tmp_path / "cache"), **kw)


def prepare_fails(cfg: DataConfig, *patterns: str) -> DataError:
    """prepare_data raises a one-line DataError matching every pattern, and writes nothing."""
    with pytest.raises(DataError) as info:
        data.prepare_data(cfg, is_writer=True)
    message = str(info.value)
    assert isinstance(info.value, MoeError) and "\n" not in message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    assert not os.path.exists(cfg.cache_dir), os.listdir(cfg.cache_dir)
    return info.value


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub access fails the test: no network, no `datasets.load_dataset`."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"went to the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------- 1. empty or too little data


@pytest.mark.parametrize("kind", ["empty_txt", "folder_of_empty_files", "jsonl_without_text"])
def test_no_text_at_all(tmp_path, kind):
    if kind == "empty_txt":
        target = tmp_path / "empty.txt"
        target.write_bytes(b"")
    elif kind == "folder_of_empty_files":
        target = tmp_path / "folder"
        target.mkdir()
        for name in ("a.txt", "b.md"):
            (target / name).write_bytes(b"")
    else:
        target = tmp_path / "rows.jsonl"
        write_jsonl(target, [{"text": ""}, {"text": None}, "\n", {"text": ""}])
    prepare_fails(cfg_for(tmp_path, target), f"data.dataset={str(target)!r}", "no ", "point data.dataset at")


def test_one_byte_file_cannot_be_split(tmp_path):
    # Today this "works" and leaves an empty train split for the sampler to trip over later.
    (tmp_path / "one.txt").write_text("a")
    prepare_fails(cfg_for(tmp_path, tmp_path / "one.txt"), "one.txt", "single document", "use more text")


def test_split_shorter_than_one_sequence(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("".join(text_of(i) for i in range(4)))  # ~1 KB: val (2%) is ~20 bytes
    cfg = cfg_for(tmp_path, path)
    with pytest.raises(DataError, match=r"small.txt.*\(validation split\): \d+ tokens make 0 sequence\(s\) of "
                                        r"train.seq_len=64, fewer than the 1 of one batch.*larger data.val_fraction"):
        data.prepare_data(cfg, seq_len=64)
    with pytest.raises(DataError, match=r"\(train split\).*train.seq_len=4096.*smaller data.val_fraction"):
        data.prepare_data(cfg_for(tmp_path, path, val_fraction=0.9), seq_len=4096)
    td = data.prepare_data(cfg, seq_len=8)  # the cache built above is complete and reused
    n_val = td.val.num_sequences(8)
    assert n_val >= 1
    with pytest.raises(DataError, match=rf"\(validation split\).*make {n_val} .*fewer than the {n_val + 1} of one"):
        data.prepare_data(cfg, seq_len=8, batch_sequences=n_val + 1)  # micro batch x data-parallel size


def test_sampler_too_small_names_the_dataset(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("".join(text_of(i) for i in range(4)))
    td = data.prepare_data(cfg_for(tmp_path, path))
    with pytest.raises(DataError, match=r"^data.dataset=.*small.txt.*\(validation split\): dataset too small"):
        data.BatchSampler(td.val, 64, 8, 0, 1, seed=0)


def test_eval_of_an_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"evaluation data '.*empty.jsonl'.*no non-empty 'text' values"):
        data.tokenize_file_for_eval(str(tmp_path / "empty.jsonl"), data.ByteTokenizer(), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------- 2. no data.text_field column


def write_parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "json_list", "json_columns"])
def test_missing_text_column(tmp_path, fmt):
    bodies = [text_of(i) for i in range(20)]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "body": b} for i, b in enumerate(bodies)])
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "d.parquet", {"id": list(range(20)), "body": bodies})
    elif fmt == "json_list":
        path = str(tmp_path / "d.json")
        json.dump([{"id": i, "body": b} for i, b in enumerate(bodies)], open(path, "w"), indent=1)
    else:
        path = str(tmp_path / "d.json")
        json.dump({"id": list(range(20)), "body": bodies}, open(path, "w"), indent=1)
    prepare_fails(cfg_for(tmp_path, path), path, "no field 'text' (data.text_field)", "available columns: id, body")
    td = data.prepare_data(cfg_for(tmp_path, path, text_field="body", val_fraction=0.2))  # the right column works
    assert td.train.num_documents + td.val.num_documents == 20


def test_missing_column_in_a_later_file_of_a_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": text_of(i)} for i in range(30)])
    bad = write_parquet(folder / "b.parquet", {"content": ["x", "y"]})
    prepare_fails(cfg_for(tmp_path, folder), bad, "no field 'text'", "available columns: content")


# ----------------------------------------------------------------------------- 3. a malformed line


@pytest.mark.parametrize("bad_line", [3, 45])  # 45: long after the split plan has seen both sides
def test_malformed_jsonl_line(tmp_path, bad_line):
    rows = [{"text": text_of(i)} for i in range(60)]
    rows[bad_line - 1] = '{"text": "cut off\n'
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepare_fails(cfg_for(tmp_path, path, val_fraction=0.2), f"{path}: line {bad_line} is not valid JSON",
                  "fix or delete that line")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, ["text", "b"], {"text": "c"}])
    prepare_fails(cfg_for(tmp_path, path), f"{path}: line 2 is a JSON list, not an object")
    with pytest.raises(DataError, match="line 2"):
        data.tokenize_file_for_eval(path, data.ByteTokenizer(), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_non_writer_ranks_fail_too(tmp_path):
    """Every rank checks local data, so none of them waits in the barrier for a writer that failed."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{oops\n"])

    def barrier():
        raise AssertionError("reached the barrier")

    with pytest.raises(DataError, match="line 2"):
        data.prepare_data(cfg_for(tmp_path, path), is_writer=False, barrier=barrier)


# --------------------------------------------------------------------------- 4. hub while offline


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset faked: records whether the HF libraries were in offline mode; returns a
    small corpus when `cached` holds True (a copy in the HF cache), else fails like the real one."""
    import datasets
    import huggingface_hub.constants as hub_constants

    state = {"calls": [], "cached": False}

    def load_dataset(name, config=None, **kwargs):
        offline = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
        state["calls"].append((name, offline))
        if state["cached"]:
            rows = {"text": [text_of(i) for i in range(20)]}
            return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
        if all(offline):
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # each test sets the flags it needs
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "_HUB_PROBE_S", 0.2, raising=False)  # seconds the reachability probe waits
    return state


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_offline_fails_fast(tmp_path, monkeypatch, fake_hub, var):
    import datasets

    flag_before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    prepare_fails(cfg_for(tmp_path, "someone/corpus"), "data.dataset='someone/corpus' is neither a local file",
                  "nor reachable on the Hugging Face hub", f"{var}=1", "internet")
    # Only the local HF cache was tried (offline mode: no retries), and the flags are restored.
    assert fake_hub["calls"] == [("someone/corpus", (True, True))]
    assert datasets.config.HF_HUB_OFFLINE is flag_before


def test_hub_unreachable_without_offline_flag(tmp_path, monkeypatch, fake_hub):
    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    prepare_fails(cfg_for(tmp_path, "someone/corpus"), "cannot connect to huggingface.co:443")
    assert fake_hub["calls"] == [("someone/corpus", (True, True))]

    fake_hub["cached"] = True  # a copy in the HF cache still trains offline
    td = data.prepare_data(cfg_for(tmp_path, "someone/corpus"))
    assert td.train.num_documents + td.val.num_documents == 20


def test_hub_probe_does_not_wait_for_a_hanging_lookup(tmp_path, monkeypatch, fake_hub):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        prepare_fails(cfg_for(tmp_path, "someone/corpus"), "no answer from huggingface.co:443 within 0.2 s")
    finally:
        release.set()


def test_hub_reachable_but_unknown_name(tmp_path, monkeypatch, fake_hub):
    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    prepare_fails(cfg_for(tmp_path, "someone/typo", dataset_config="small"),
                  "data.dataset='someone/typo' (data.dataset_config='small') is not a local path and could not be "
                  "loaded from the Hugging Face hub (FileNotFoundError: Dataset 'someone/typo' doesn't exist")
    assert fake_hub["calls"] == [("someone/typo", (False, False))]  # online: a normal load


def test_hub_tokenizer_offline_fails_fast(monkeypatch):
    import huggingface_hub.constants as hub_constants
    import tokenizers

    seen = []

    class Offline:
        @staticmethod
        def from_pretrained(name):
            seen.append(hub_constants.HF_HUB_OFFLINE)
            raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tokenizers, "Tokenizer", Offline)
    with pytest.raises(DataError, match=r"^data.tokenizer='someone/tok': .*unreachable: HF_HUB_OFFLINE=1.*internet"):
        data.build_tokenizer(DataConfig(tokenizer="someone/tok"))
    assert seen == [True]


# ------------------------------------------------------------------ 5. local paths are never hub names


def test_existing_files_without_extension_are_read_locally(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").write_text("".join(text_of(i) for i in range(5)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus").write_text("".join(text_of(i) for i in range(5, 10)))
    for spec, expected in (("mydata", 5), ("data/corpus", 10)):
        td = data.prepare_data(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")))
        text = td.tokenizer.decode(np.concatenate([td.train.tokens, td.val.tokens]).tolist())
        assert text == (tmp_path / spec).read_text() and f"document {expected - 1}" in text
        ds = data.tokenize_file_for_eval(spec, td.tokenizer, str(tmp_path / "cache"))
        assert ds.num_tokens == len((tmp_path / spec).read_bytes()) + 1


@pytest.mark.parametrize("spec", ["a/b/c", "./relative", "~/no_such_moe_dir/x", "corpus.txt", "data/corpus.csv",
                                  "org/set.parquet", "corpus.jsonl"])
def test_missing_path_is_file_not_found(tmp_path, monkeypatch, no_hub, spec):
    monkeypatch.chdir(tmp_path)
    error = prepare_fails(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")),
                          f"data.dataset: file not found: {spec}")
    assert isinstance(error, FileNotFoundError)
    with pytest.raises(DataError, match=f"evaluation data: file not found: {spec}"):
        data.tokenize_file_for_eval(spec, data.ByteTokenizer(), str(tmp_path / "cache"))


@pytest.mark.parametrize("spec", ["mydata", "org/name", "org/name-v1.5"])
def test_missing_hub_shaped_name_says_both(tmp_path, monkeypatch, fake_hub, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare_fails(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")),
                  f"is neither a local file or folder (no {os.path.abspath(spec)}) nor reachable on the Hugging Face "
                  f"hub (HF_HUB_OFFLINE=1)")


# ---------------------------------------------------------------------------- 6. max_bytes is a limit


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_max_bytes_reads_only_a_prefix(tmp_path, fmt):
    # Warm up first: megatron-core and the rest are imported (and their files read) here.
    (tmp_path / "warm.txt").write_text(text_of(0) * 3)
    data.prepare_data(cfg_for(tmp_path, tmp_path / "warm.txt"))
    line = text_of(1)
    if fmt == "txt":
        path = tmp_path / "big.txt"
        path.write_text(line * (20_000_000 // len(line)))
    else:
        path = tmp_path / "big.jsonl"
        row = json.dumps({"text": line}) + "\n"
        path.write_text(row * (20_000_000 // len(row)))
    assert path.stat().st_size > 19_000_000

    before = bytes_read()
    td = data.prepare_data(cfg_for(tmp_path, path, max_bytes=10_000, val_fraction=0.1))
    read = bytes_read() - before
    assert read < 1_000_000, f"read {read} bytes of a {path.stat().st_size}-byte file for max_bytes=10000"
    docs = td.train.num_documents + td.val.num_documents
    assert td.train.num_tokens + td.val.num_tokens == 10_000 + docs  # exactly max_bytes, plus one EOS each


# ------------------------------------------------------------------------ 7. leftovers of killed builds


def test_leftover_temp_folders_of_killed_builds_are_removed(tmp_path):
    from filelock import FileLock

    path = tmp_path / "d.txt"
    path.write_text("".join(text_of(i) for i in range(30)))
    cfg = cfg_for(tmp_path, path, val_fraction=0.2)
    first = data.prepare_data(cfg)
    tokens_dir = os.path.dirname(first.cache_path)
    # What `kill -9` during tokenization leaves: a temp folder (of another key here) and its lock file...
    dead = os.path.join(tokens_dir, ".tmp-d-bytes-0123456789abcdef-k1ll3d_x")
    os.makedirs(dead)
    (tmp_path / "half.bin").write_bytes(b"\0" * 100)
    os.replace(tmp_path / "half.bin", os.path.join(dead, "train.bin"))
    open(os.path.join(tokens_dir, "d-bytes-0123456789abcdef.lock"), "w").close()
    # ...and one a live process is building right now (its lock is held).
    busy = os.path.join(tokens_dir, ".tmp-d-bytes-fedcba9876543210-bu5y_abc")
    os.makedirs(busy)
    with FileLock(os.path.join(tokens_dir, "d-bytes-fedcba9876543210.lock")):
        again = data.prepare_data(cfg)  # a cache hit still sweeps the folder
        assert not os.path.exists(dead) and os.path.isdir(busy)
    assert again.cache_path == first.cache_path
    data.prepare_data(cfg)
    assert not os.path.exists(busy)  # its builder is gone now


def test_killed_build_never_leaves_a_cache_in_use(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text_of(i)} for i in range(30)])
    cfg = cfg_for(tmp_path, path, val_fraction=0.2)
    real_add = data._SplitWriter.add
    added = []

    def add_then_die(self, ids):
        added.append(1)
        if len(added) == 5:
            raise KeyboardInterrupt  # a signal in the middle of writing the token files
        real_add(self, ids)

    monkeypatch.setattr(data._SplitWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_data(cfg)
    tokens_dir = tmp_path / "cache" / "tokens"
    assert [p for p in os.listdir(tokens_dir) if not p.endswith(".lock")] == []
    monkeypatch.setattr(data._SplitWriter, "add", real_add)
    td = data.prepare_data(cfg)
    assert td.train.num_documents + td.val.num_documents == 30
    assert json.load(open(os.path.join(td.cache_path, "meta.json")))["train"]["documents"] == td.train.num_documents
