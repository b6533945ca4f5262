"""moe/launch/snapshot.py: the code snapshot of a launch (the secret-file cases are in
tests/integration/test_launch_safety.py, with a whole launch)."""
import os
import subprocess

from moe.launch.snapshot import secret_file_reason, write_code_snapshot


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    *args], cwd=repo, check=True, capture_output=True)


def test_not_a_git_checkout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    out = write_code_snapshot(str(tmp_path / "run"), "20260101-000000", source=str(src))
    assert out == str(tmp_path / "run" / "code" / "20260101-000000")
    assert os.listdir(out) == ["commit.txt"]
    assert (tmp_path / "run" / "code" / "20260101-000000" / "commit.txt").read_text() == \
        f"source: {src}\nnot a git checkout: no code snapshot\n"


def test_snapshot_of_a_checkout(tmp_path, capsys):
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("v = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "a.py").write_text("v = 2\n")
    (repo / "big.bin").write_bytes(b"x" * 200)
    (repo / "small.txt").write_text("hello\n")
    (repo / "id_rsa").write_text("not really\n")
    os.symlink(repo / "small.txt", repo / "link.txt")
    out = write_code_snapshot(str(tmp_path / "run"), "s", max_untracked_bytes=100, source=str(repo))
    files = sorted(os.listdir(out))
    assert files == ["commit.txt", "left_out.txt", "uncommitted.diff"]
    commit = open(os.path.join(out, "commit.txt")).read()
    assert f"source: {repo}\ncommit: " in commit and "uncommitted changes: 5 file(s)" in commit
    assert "untracked files over 100 bytes, not in the diff: big.bin\n" in commit
    assert "untracked files that look like secrets, not in the diff: id_rsa (see left_out.txt)\n" in commit
    diff = open(os.path.join(out, "uncommitted.diff")).read()
    assert "+v = 2" in diff and "+++ b/small.txt" in diff and "big.bin" not in diff and "link.txt" not in diff
    assert open(os.path.join(out, "left_out.txt")).read() == (
        "Untracked files of the checkout that are not in uncommitted.diff (names only):\n"
        "id_rsa: its name looks like a secret's\nbig.bin: over 100 bytes\n")
    assert "left out 1 untracked file(s) that look like secrets: id_rsa" in capsys.readouterr().err


def test_secret_folders_and_token_names():
    assert secret_file_reason("deploy/.aws/config") == "it lies in a folder of secrets"
    assert secret_file_reason("my_token.txt") == "its name looks like a secret's"
    assert secret_file_reason("tokens.csv") is None and secret_file_reason("tokenizer.json") is None
    assert secret_file_reason("a.txt", b"AKIA" + b"A" * 16 + b"\n", env={}) == "it holds a private key or an access token"
