"""Tests of moe/data/hub.py: hub datasets through `datasets.load_dataset` (faked: no network in tests),
and a one-line DataError, fast, when the hub is out of reach (CPU, in-process, a few seconds)."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from moe import data
from moe.config import DataConfig
from moe.data import hub
from tests.helpers import data_cfg, make_doc, prepare_fails, split_docs, text_of


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
    monkeypatch.setattr(hub, "_HUB_PROBE_S", 0.2)  # seconds the reachability probe waits
    return state


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


# ----------------------------------------------------------------------------------- hub while offline


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_offline_fails_fast(tmp_path, monkeypatch, fake_hub, var):
    import datasets

    flag_before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    prepare_fails(data_cfg(tmp_path, "someone/corpus"), "data.dataset='someone/corpus' is neither a local file",
                  "nor reachable on the Hugging Face hub", f"{var}=1", "internet")
    # Only the local HF cache was tried (offline mode: no retries), and the flags are restored.
    assert fake_hub["calls"] == [("someone/corpus", (True, True))]
    assert datasets.config.HF_HUB_OFFLINE is flag_before


def test_hub_unreachable_without_offline_flag(tmp_path, monkeypatch, fake_hub):
    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    prepare_fails(data_cfg(tmp_path, "someone/corpus"), "cannot connect to huggingface.co:443")
    assert fake_hub["calls"] == [("someone/corpus", (True, True))]

    fake_hub["cached"] = True  # a copy in the HF cache still trains offline
    td = data.prepare_data(data_cfg(tmp_path, "someone/corpus"))
    assert td.train.num_documents + td.val.num_documents == 20


def test_hub_probe_does_not_wait_for_a_hanging_lookup(tmp_path, monkeypatch, fake_hub):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        prepare_fails(data_cfg(tmp_path, "someone/corpus"), "no answer from huggingface.co:443 within 0.2 s")
    finally:
        release.set()


def test_hub_reachable_but_unknown_name(tmp_path, monkeypatch, fake_hub):
    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    prepare_fails(data_cfg(tmp_path, "someone/typo", dataset_config="small"),
                  "data.dataset='someone/typo' (data.dataset_config='small') is not a local path and could not be "
                  "loaded from the Hugging Face hub (FileNotFoundError: Dataset 'someone/typo' doesn't exist")
    assert fake_hub["calls"] == [("someone/typo", (False, False))]  # online: a normal load


@pytest.mark.parametrize("spec", ["mydata", "org/name", "org/name-v1.5"])
def test_missing_hub_shaped_name_says_both(tmp_path, monkeypatch, fake_hub, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare_fails(DataConfig(dataset=spec, cache_dir=str(tmp_path / "cache")),
                  f"is neither a local file or folder (no {os.path.abspath(spec)}) nor reachable on the Hugging Face "
                  f"hub (HF_HUB_OFFLINE=1)")
