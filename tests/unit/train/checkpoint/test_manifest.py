"""moe/train/checkpoint/manifest.py: checksums of every file, and of the manifest itself."""
import json

from moe.train.checkpoint.manifest import check_manifest, write_manifest
from moe.train.checkpoint.folders import VERSION


def _folder(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 8)
    write_manifest(str(tmp_path))
    return tmp_path


def test_an_intact_folder_passes(tmp_path):
    assert check_manifest(str(_folder(tmp_path)), VERSION) == []


def test_a_flipped_byte_anywhere_is_caught(tmp_path):
    folder = _folder(tmp_path)
    for name in ("b.bin", "manifest.json"):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 1
        (folder / name).write_bytes(bytes(data))
        assert check_manifest(str(folder), VERSION), name
        data[len(data) // 2] ^= 1
        (folder / name).write_bytes(bytes(data))
    assert check_manifest(str(folder), VERSION) == []


def test_a_missing_or_extra_file_is_caught(tmp_path):
    folder = _folder(tmp_path)
    (folder / "extra.txt").write_text("x")
    assert any("extra.txt" in p for p in check_manifest(str(folder), VERSION))
    (folder / "extra.txt").unlink()
    (folder / "a.json").unlink()
    assert any("a.json" in p for p in check_manifest(str(folder), VERSION))
    assert json.loads((folder / "manifest.json").read_text())
