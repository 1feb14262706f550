"""Inputs a run needs and cannot make: data sets, model weights. Checked by the driver before
any work starts, and said in one line when missing.

A missing SA-1B links file, model folder or hub id is not a failure a rerun can fix, so it is
neither a per-sample failure nor a shard to retry: the command ends with one line that names
the config key, what is missing, where to get it and where to put it, and a non-zero status
(shardkit.cli.run_main prints it; no traceback)."""

from __future__ import annotations

import logging
import os
import re

from shardkit import storage
from shardkit.runner import StageError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
"""`org/name`, as the Hugging Face hub spells a repository."""
HUB_TIMEOUT_S = 10.0


class MissingInput(StageError):
    """An input that is not there: `key` is the config key that names it."""

    def __init__(self, key: str, missing: str, get: str) -> None:
        self.key, self.missing, self.get = key, missing, get
        super().__init__(f"{key}: {missing}; {get}")


IMAGE_FOLDER_FROM = ("put the images there (for ImageNet, ILSVRC2012's train set from image-net.org, one sub-folder "
                     "per synset)")


def require_path(key: str, uri: str, what: str, get: str) -> None:
    """`uri` (a local path or an object-store URI) must exist; `get` says where to get it and
    that it goes there."""
    if not storage.exists(uri):
        raise MissingInput(key, f"{what} {uri} does not exist", f"{get}, or set {key}")


def is_hub_id(reference: str) -> bool:
    """A hub repository name rather than a path: `org/name`, not a folder that exists here.
    (transformers reads it the same way: a local folder of that name wins.)"""
    return bool(HUB_ID.match(reference)) and not os.path.exists(reference)


def require_model(key: str, reference: str, marker: str | None = "config.json") -> None:
    """A model named by a config key must be loadable from here: a folder (local or URI) with
    `marker` in it (None: the path itself, a weights file or a folder), or a hub id the hub
    answers for or the local hub cache holds."""
    if is_hub_id(reference):
        _require_hub(key, reference, marker or "config.json")
        return
    target = reference if marker is None else storage.join(reference, marker)
    if storage.exists(target):
        return
    what = "the model file or folder" if marker is None else f"the model folder (with {marker})"
    found = "it does not exist" if not storage.exists(reference) else f"it has no {marker}"
    raise MissingInput(key, f"{what} {reference}: {found}",
                       f"put the model there (save_pretrained, or `huggingface-cli download <hub id> --local-dir "
                       f"{reference}` where the hub is reachable), or set {key} to a folder, URI or hub id that has it")


def _require_hub(key: str, repo: str, filename: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str) and os.path.isfile(cached):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set and the local hub cache does not hold it"
    else:
        reason = _hub_problem(repo)
        if reason is None:
            return
    raise MissingInput(key, f"the hub model {repo} cannot be loaded here: {reason}",
                       f"download it where the hub is reachable (`huggingface-cli download {repo} --local-dir <folder>`), "
                       f"put the folder on this machine or an object store, and set {key} to it")


def _hub_problem(repo: str) -> str | None:
    """Why the hub does not give `repo` to this machine, or None when it does."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "it is gated: accept its licence on the hub and log in (`huggingface-cli login`, or HF_TOKEN)"
    except RepositoryNotFoundError:
        return "the hub has no such repository (or it is private and this machine is not logged in)"
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, TLS: all mean the same here
        log.debug("hub check of %s failed", repo, exc_info=True)
        return f"the hub is not reachable from this machine ({type(exc).__name__})"
    return None
