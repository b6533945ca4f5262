"""Hugging Face hub datasets, and failing fast when the hub is out of reach.

A hub dataset is loaded with `datasets` (online, or from the Hugging Face cache). Before a hub
dataset or tokenizer is loaded, `_hub_unreachable` checks an offline flag and probes the hub for
3 s; when it is out of reach only the local cache is tried (`_hub_offline`), instead of ~25 s of
network retries, and the error says that hub data needs internet access.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from typing import TYPE_CHECKING, Iterator, List, Optional

from moe.data.formats import _as_text, _check_columns, _one_line
from moe.errors import DataError

if TYPE_CHECKING:  # only for annotations: moe.data.sources imports this module
    from moe.data.sources import _Source

_HUB_PROBE_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _load_hub_split(source: _Source):
    """The split of a hub dataset that `source.hub_splits` picks, with its text column checked.

    When the hub cannot be reached (an offline flag, or no connection within 3 s) only the local
    Hugging Face cache is tried: `datasets` itself would retry the network for ~25 s first.
    """
    datasets = _import_datasets()
    where = source.describe() + (f" (data.dataset_config={source.hub_config!r})" if source.hub_config else "")
    unreachable = _hub_unreachable()
    try:
        with _hub_offline() if unreachable else contextlib.nullcontext():
            dsd = datasets.load_dataset(source.spec, source.hub_config)
    except Exception as exc:
        if unreachable:
            raise DataError(
                f"{where} is neither a local file or folder (no {os.path.abspath(source.spec)}) nor reachable on "
                f"the Hugging Face hub ({unreachable}), and it is not in the Hugging Face datasets cache; hub "
                f"datasets need internet access: offline, use a local file or folder or `embedded:stdlib`") from exc
        raise DataError(f"{where} is not a local path and could not be loaded from the Hugging Face hub "
                        f"({type(exc).__name__}: {_one_line(exc)}); check the name and data.dataset_config "
                        f"(hub datasets need internet access)") from exc
    # Only one split is read: mixing a hub dataset's test split into training would leak it. The
    # train/val split of this pipeline is then made by document hash, as for every corpus.
    split = next((s for s in source.hub_splits if s in dsd), sorted(dsd)[0])
    ds = dsd[split]
    _check_columns(f"{where} split {split!r}", source.text_field, ds.column_names)
    return ds


def _column_texts(ds, field_name: str) -> Iterator[str]:
    # Batched column access avoids building one dict per row.
    for batch in ds.select_columns([field_name]).iter(batch_size=1000):
        for text in batch[field_name]:
            if text is not None:
                yield _as_text(text)


def _hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be used now (an offline flag, no connection), or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    import urllib.parse
    import urllib.request  # not at module level: it imports http.client and email

    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):  # behind a proxy only the proxy is reachable
        p = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    return _tcp_unreachable(host, port, _HUB_PROBE_S)


def _tcp_unreachable(host: str, port: int, timeout: float) -> Optional[str]:
    result: List[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port}: {exc}")

    # The DNS lookup ignores socket timeouts, so the probe runs in a thread that is not waited for.
    thread = threading.Thread(target=probe, name="moe-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return (result[0] or None) if result else f"no answer from {host}:{port} within {timeout:g} s"


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face libraries in offline mode (cache only, no retries) for the duration.

    Their offline flags are read from the environment at import time, so the module constants are
    set (and restored) rather than the environment variables.
    """
    from huggingface_hub import constants

    modules = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


def _import_datasets():
    import datasets

    # Progress bars from `datasets` would interleave with the training progress bar.
    datasets.disable_progress_bars()
    return datasets
