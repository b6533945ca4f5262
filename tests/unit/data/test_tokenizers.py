"""Tests of moe/data/tokenizers.py: bytes, trained BPE and pretrained tokenizers, saving and loading,
and the one-line error for a hub tokenizer out of reach (CPU, a few seconds, no network)."""
from __future__ import annotations

import pytest

from moe import data
from moe.config import DataConfig
from moe.errors import DataError
from tests.helpers import make_doc, write_text_folder


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


def test_hub_tokenizer_offline_error(monkeypatch):
    import tokenizers

    class Offline:
        @staticmethod
        def from_pretrained(name):
            raise OSError("Name or service not known")

    monkeypatch.setattr(tokenizers, "Tokenizer", Offline)
    with pytest.raises(ValueError, match=r"data.tokenizer='gpt2'.*internet"):
        data.build_tokenizer(DataConfig(tokenizer="gpt2"))


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
