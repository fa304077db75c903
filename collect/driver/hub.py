"""Fail fast when a workload needs the Hugging Face hub and the hub cannot be reached.

Offline, `datasets.load_dataset` and `AutoTokenizer.from_pretrained` retry for 25-40 s before their
error. Before loading, `check_hub_access` names what needs the hub (a dataset without `--dataset-path`, a
tokenizer given as a hub id) and, unless a local cache already holds it, checks that the hub answers: a
declared offline mode (`HF_HUB_OFFLINE` and friends) or a TCP connection to the hub (or its proxy) that
fails within `PROBE_TIMEOUT_S` is a one-line CollectError in well under 2 s. When the hub is unreachable
but the cache holds everything, the libraries are put in offline mode so they read the cache without
retrying.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import CollectError

PROBE_TIMEOUT_S = 1.5
"""Longest wait for the hub's TCP handshake (DNS included)."""

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}


def hub_needs(dataset: str, dataset_path: str | None, tokenizer: str | None) -> list[tuple[str, str, str]]:
    """(what, hub repo id, repo kind) for each thing the workload would fetch from the hub.

    kind is `datasets` or `models`. Synthetic workloads, local copies and local tokenizer paths need
    nothing; an unknown dataset name needs nothing here (loading names the mistake)."""
    from ..datasets import registry

    needs = []
    if not dataset.startswith("synthetic:") and dataset_path is None:
        name = dataset.split(":", 1)[0]
        try:
            spec = registry.resolve_dataset(name)
        except CollectError:
            spec = None
        if spec is not None:
            needs.append((f"dataset {spec.name} ({spec.hub_id})", spec.hub_id, "datasets"))
    if tokenizer is not None and not Path(tokenizer).exists():
        needs.append((f"tokenizer {tokenizer!r}", tokenizer, "models"))
    return needs


def declared_offline() -> str | None:
    """The name of the variable that declares offline mode, if one does."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUE), None)


def cached(repo_id: str, kind: str) -> bool:
    """True when a local Hugging Face cache holds something of `repo_id` (hub snapshot or, for datasets,
    the `datasets` library's own cache); whether it is complete is the library's to say."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    places = [hub / f"{kind}--{repo_id.replace('/', '--')}"]
    if kind == "datasets":
        ds_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
        places.append(ds_cache / repo_id.replace("/", "___"))
    elif os.environ.get("TRANSFORMERS_CACHE"):
        places.append(Path(os.environ["TRANSFORMERS_CACHE"]) / f"models--{repo_id.replace('/', '--')}")
    return any(p.is_dir() for p in places)


def probe_target() -> tuple[str, int]:
    """(host, port) a hub request would connect to first: the HTTPS proxy when one is set, else the hub
    endpoint (`HF_ENDPOINT`, default https://huggingface.co)."""
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        None,
    )
    url = urlsplit(proxy if proxy else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (None when a TCP connection to it opens within `timeout_s`).

    The connection runs in a thread so that a resolver that hangs is bounded too."""
    host, port = probe_target()
    result: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port}: {exc.strerror or exc}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        return f"{host}:{port}: no answer within {timeout_s:g} s"
    return result[0]


def check_hub_access(dataset: str, dataset_path: str | None, tokenizer: str | None) -> None:
    """Raise CollectError now when the workload needs the hub and neither the hub nor a cache can serve it."""
    needs = hub_needs(dataset, dataset_path, tokenizer)
    if not needs:
        return
    missing = [(what, kind) for what, repo, kind in needs if not cached(repo, kind)]
    offline = declared_offline()
    if offline is not None:
        if missing:
            raise CollectError(_message(missing[0], f"{offline} is set and it is not in the local cache"))
        return
    if not missing:
        # Cached: the libraries read the cache; if the hub is down they would still retry first.
        if unreachable() is not None:
            _go_offline()
        return
    reason = unreachable()
    if reason is not None:
        raise CollectError(_message(missing[0], f"the hub cannot be reached ({reason}) and it is not cached"))


def _message(missing: tuple[str, str], why: str) -> str:
    what, kind = missing
    fix = "pass a local copy with --dataset-path" if kind == "datasets" else "pass a local tokenizer folder"
    return f"{what}: {why}; {fix}"


def _go_offline() -> None:
    # Read when huggingface_hub / datasets / transformers are first imported, which the loaders do lazily.
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
