"""The code snapshot of a launch: `code/<time>/` in each run folder, from the checkout moe runs from.

`commit.txt` names the commit, branch and `git status`; `uncommitted.diff` is `git diff HEAD` plus the
untracked, not ignored files as new-file diffs, except the files that look like secrets (by name,
folder or contents, see `secret_file_reason`) or are too large: `left_out.txt` names those, with the
reason. Secret values are redacted from every file written.
"""
from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from moe.io import secret_values
from moe.launch.run_folder import write

# the checkout moe runs from (the default source of the snapshot)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Untracked files that are left out of the code snapshot by their name (matched against the file's
# name, lower-cased): env files, keys and certificates, credential stores of common tools.
SECRET_FILE_NAMES = (".env*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
                     "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", "_netrc",
                     ".npmrc", ".pypirc", ".git-credentials", ".htpasswd", ".pgpass", ".s3cfg", ".boto",
                     ".dockercfg", "credentials*", "*secret*", "*password*", "*passwd*", "*apikey*",
                     "*api_key*", "*api-key*", "service-account*.json", "*-sa-key*.json")
# and any name with `token` in it, but not `tokens` (data, plots: `loss_vs_tokens.png`) nor `tokenizer`
_SECRET_TOKEN_NAME = re.compile(r"token(?!s|i[sz])")
# Folders whose files are all left out (any folder of the path, lower-cased).
SECRET_DIR_NAMES = frozenset({".ssh", ".gnupg", ".aws", ".azure", ".docker", ".kube", ".secrets", "secrets",
                              "credentials"})
# Contents that give a file away: a private key, or a token in a well-known format.
SECRET_CONTENT = re.compile(
    rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    rb"|\bhf_[A-Za-z0-9]{30,}|\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{40,}"
    rb"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}")


def _git(args: List[str], cwd: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def secret_file_reason(rel: str, data: Optional[bytes] = None, env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Why the file `rel` (a path; `data` its contents, when read) must stay out of the code
    snapshot, or None: its name looks like a secret's, it holds a private key or a token of a
    well-known format, or it contains the value of an environment variable named like a secret."""
    *folders, name = rel.replace(os.sep, "/").lower().split("/")
    if SECRET_DIR_NAMES.intersection(folders):
        return "it lies in a folder of secrets"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_FILE_NAMES) or _SECRET_TOKEN_NAME.search(name):
        return "its name looks like a secret's"
    if data is None:
        return None
    if SECRET_CONTENT.search(data):
        return "it holds a private key or an access token"
    if any(value.encode() in data for value in secret_values(env)):
        return "it contains the value of a secret environment variable"
    return None


def _untracked_diff(source: str, max_untracked_bytes: int) -> Tuple[str, List[str], List[Tuple[str, str]]]:
    """(new-file diffs of the untracked, not ignored files, the files over the size limit, the
    (file, reason) of those that look like secrets); links and non-files are skipped silently."""
    diff, skipped, secret = "", [], []
    for rel in (_git(["ls-files", "--others", "--exclude-standard", "-z"], source) or "").split("\0"):
        path = os.path.join(source, rel)
        if not rel or not os.path.isfile(path) or os.path.islink(path):
            continue
        reason = secret_file_reason(rel)
        if reason is None and os.path.getsize(path) > max_untracked_bytes:
            skipped.append(rel)
            continue
        if reason is None:
            try:
                with open(path, "rb") as f:
                    reason = secret_file_reason(rel, f.read())
            except OSError as exc:
                reason = f"unreadable ({exc.strerror})"
        if reason is not None:
            secret.append((rel, reason))
            continue
        proc = subprocess.run(["git", "--no-optional-locks", "diff", "--no-index", "--binary", "/dev/null", rel],
                              cwd=source, capture_output=True, text=True, errors="replace")
        diff += proc.stdout
    return diff, skipped, secret


def write_code_snapshot(run_dir: str, stamp: str, max_untracked_bytes: int = 1 << 20,
                        source: Optional[str] = None) -> str:
    """code/<stamp>/commit.txt (commit, branch, status) and uncommitted.diff: `git diff HEAD` plus
    untracked, not ignored files under 1 MiB as new-file diffs, of the checkout `source` (default:
    the one moe runs from). Untracked files that look like secrets (see `secret_file_reason`) are
    left out and named, with the reason, in left_out.txt; secret values are redacted everywhere."""
    source = source or ROOT
    out = os.path.join(run_dir, "code", stamp)
    head = _git(["rev-parse", "HEAD"], source)
    if head is None:
        write(os.path.join(out, "commit.txt"), f"source: {source}\nnot a git checkout: no code snapshot\n")
        return out
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], source) or "?").strip()
    status = _git(["status", "--porcelain"], source) or ""
    diff = _git(["diff", "HEAD", "--binary"], source) or ""
    untracked, skipped, secret = _untracked_diff(source, max_untracked_bytes)
    diff += untracked
    left_out = [f"{rel}: {reason}" for rel, reason in secret]
    left_out += [f"{rel}: over {max_untracked_bytes} bytes" for rel in skipped]
    write(os.path.join(out, "commit.txt"),
          f"source: {source}\ncommit: {head.strip()}\nbranch: {branch}\n"
          f"uncommitted changes: {len(status.splitlines())} file(s) (see uncommitted.diff; "
          f"apply with `git apply uncommitted.diff` on this commit)\n"
          + (f"untracked files over {max_untracked_bytes} bytes, not in the diff: {', '.join(skipped)}\n"
             if skipped else "")
          + (f"untracked files that look like secrets, not in the diff: {', '.join(r for r, _ in secret)} "
             f"(see left_out.txt)\n" if secret else "")
          + "\ngit status --porcelain:\n" + status)
    write(os.path.join(out, "uncommitted.diff"), diff)
    if left_out:
        write(os.path.join(out, "left_out.txt"),
              "Untracked files of the checkout that are not in uncommitted.diff (names only):\n"
              + "".join(line + "\n" for line in left_out))
    if secret:
        print(f"[moe launch] code snapshot: left out {len(secret)} untracked file(s) that look like secrets: "
              f"{', '.join(r for r, _ in secret)} (listed in {os.path.join(out, 'left_out.txt')})",
              file=sys.stderr, flush=True)
    return out
