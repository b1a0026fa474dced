"""Downloading a model repo from the Hugging Face Hub into the shared Hugging Face cache.

huggingface_hub does the HTTP, the cache layout, locking and retries, and reads
HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE itself, so files other
Hugging Face tools fetched are reused, and ours are theirs. This module fetches
the files ffchat asks for, draws progress, and turns huggingface_hub's
exceptions into one-line FfchatErrors. huggingface_hub is imported inside the
functions: `ffchat --help` should not pay for it.

Resuming: finished files stay in the cache, so running `pull` again fetches
only what is missing. Within a run, huggingface_hub resumes a file whose
connection dropped with a Range request; since 1.0 it deletes the partial file
when the run fails, so across runs a half-downloaded file starts over.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ffchat.errors import FfchatError

RESUME_HINT = "run the same command again to resume"
TOKEN_HINT = "pass --token, set HF_TOKEN, or run `huggingface-cli login`"
# Packages whose exceptions mean the Hub could not be reached (huggingface_hub
# turns HTTP error statuses into HfHubHTTPError, so what is left is transport).
HTTP_CLIENTS = ("httpx2", "httpx", "httpcore", "requests", "urllib3")


@dataclass
class Snapshot:
    """One commit of a Hub repo, as it sits (or will sit) in the Hugging Face cache."""

    repo_id: str
    revision: str
    commit: str
    directory: Path
    sizes: dict[str, int | None]  # every file of the commit -> size in bytes, when known
    token: str | None = None


def open_snapshot(repo_id: str, *, revision: str | None, token: str | None) -> Snapshot:
    """Resolve the revision to a commit, list the commit's files, and fetch config.json.

    Fetching config.json by revision makes huggingface_hub record the revision
    in the cache's refs, which is what lets an offline pull (HF_HUB_OFFLINE=1)
    find the commit later; offline, the file list comes from the cached snapshot.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import OfflineModeIsEnabled

    _quiet()
    revision = revision or "main"
    with hub_errors(repo_id, revision):
        try:  # first, because it fails at once when the Hub is unreachable, where hf_hub_download retries for ~25 s
            commit, sizes = _listing(repo_id, revision, token)
        except OfflineModeIsEnabled:
            commit, sizes = None, None
        if sizes is not None and "config.json" not in sizes:
            raise FfchatError(
                f"{repo_id} has no config.json, so it is not a Hugging Face transformers model",
                hint="for a GGUF repo, download the .gguf file and pass its path",
            )
        directory = Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token)).parent
        if sizes is None:
            sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
        elif commit != directory.name:  # the branch moved between the two requests
            _, sizes = _listing(repo_id, directory.name, token)
    return Snapshot(repo_id, revision, directory.name, directory, sizes, token)


def _listing(repo_id: str, revision: str, token: str | None) -> tuple[str, dict[str, int | None]]:
    """The commit a revision points at, and its files with their sizes."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True)
    return info.sha, {entry.rfilename: entry.size for entry in info.siblings or []}


def fetch(snapshot: Snapshot, names: list[str], console: Console) -> None:
    """Download the named files of the snapshot into the cache; files already there are not fetched again."""
    from huggingface_hub import hf_hub_download

    missing = [name for name in names if not (snapshot.directory / name).exists()]
    if not missing:
        return
    _quiet()
    with hub_errors(snapshot.repo_id, snapshot.revision, hint=RESUME_HINT), _FileProgress(console, snapshot) as progress:
        for name in missing:
            progress.start(name, snapshot.sizes.get(name))
            path = hf_hub_download(snapshot.repo_id, name, revision=snapshot.commit, token=snapshot.token)
            progress.finish(Path(path).stat().st_size)


def purge(repo_id: str, commit: str) -> bool:
    """Delete one commit of a repo from the Hugging Face cache: its snapshot, the blobs no other commit uses, and
    the repo folder when nothing else is left. Other commits, fetched by other tools, stay. False when not cached."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return False
    for repo in cache.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model" and commit in {r.commit_hash for r in repo.revisions}:
            cache.delete_revisions(commit).execute()
            return True
    return False


@contextmanager
def hub_errors(repo_id: str, revision: str, *, hint: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line FfchatErrors, and tell a Ctrl+C how to resume."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(RESUME_HINT) from None
    except GatedRepoError as exc:  # before RepositoryNotFoundError, its base class
        raise FfchatError(f"{repo_id} is gated: downloading it needs a token with access", hint=TOKEN_HINT) from exc
    except RepositoryNotFoundError as exc:
        raise FfchatError(
            f"repository {repo_id} not found on the Hub",
            hint="check the name; a private repo needs --token or HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise FfchatError(f"revision {revision!r} not found in {repo_id}", hint="check the branch, tag or commit") from exc
    except HFValidationError as exc:
        raise FfchatError(f"{repo_id!r} is neither an existing file or folder nor a valid Hub repo id") from exc
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise FfchatError(
                f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it",
            ) from exc
        raise _unreachable(hint) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise FfchatError(f"the Hub refused access to {repo_id} (HTTP {status})", hint=TOKEN_HINT) from exc
        raise FfchatError(f"the Hub answered: {_first_line(exc)}", hint=hint) from exc
    except Exception as exc:
        if _is_network_error(exc):
            raise _unreachable(hint) from exc
        if isinstance(exc, OSError):  # disk full, cache not writable, size mismatch
            raise FfchatError(f"download failed: {_first_line(exc)}", hint=hint) from exc
        raise


def _quiet() -> None:
    """Silence huggingface_hub's tqdm bars (ours replace them) and its warnings (our errors say what matters)."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


def _unreachable(hint: str | None) -> FfchatError:
    from huggingface_hub import constants

    return FfchatError(
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT}",
        hint=hint or "check your connection; or pass a local folder or .gguf path, "
        "or set HF_HUB_OFFLINE=1 to use files already in the Hugging Face cache",
    )


def _is_network_error(exc: BaseException) -> bool:
    """A connection failure, whichever HTTP client this huggingface_hub uses (requests, httpx or httpx2)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__module__.split(".")[0] in HTTP_CLIENTS for cls in type(exc).__mro__)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class _FileProgress:
    """A rich bar per downloaded file on a terminal (nothing when stderr is not one).

    huggingface_hub writes each file to a `*.incomplete` file in the repo's
    blobs/ folder before moving it into place, in every version, so a watcher
    thread reads progress from that file's size; its tqdm bars, the
    alternative, change interface from version to version.
    """

    def __init__(self, console: Console, snapshot: Snapshot):
        self.blobs = snapshot.directory.parent.parent / "blobs"  # <repo folder>/snapshots/<commit> -> <repo folder>/blobs
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console, disable=not console.is_terminal,
        )
        self.task = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "_FileProgress":
        self.bars.start()
        if not self.bars.disable:
            self.watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        if self.watcher.is_alive():
            self.watcher.join()
        self.bars.stop()

    def start(self, name: str, size: int | None) -> None:
        with self.lock:
            self.task = self.bars.add_task(name, total=size)

    def finish(self, size: int) -> None:
        with self.lock:
            self.bars.update(self.task, total=size, completed=size)
            self.task = None

    def _watch(self) -> None:
        while not self.stopped.wait(0.2):
            partial = self._partial_bytes()
            with self.lock:
                if self.task is not None:
                    self.bars.update(self.task, completed=partial)

    def _partial_bytes(self) -> int:
        sizes = [0]
        for path in self.blobs.glob("*.incomplete"):
            try:
                sizes.append(path.stat().st_size)
            except OSError:  # moved into place meanwhile
                pass
        return max(sizes)
