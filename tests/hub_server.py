"""A loopback stand-in for the Hugging Face Hub, and model variants and checks for the tests that pull.

The server speaks what huggingface_hub's download path uses (learned from its
source: `HfApi.model_info` and `hf_hub_download`): model info with the commit
sha and the files' sizes, HEAD and GET on /{repo}/resolve/{revision}/{file}
with X-Repo-Commit, ETag and Content-Length, Range requests answered with 206,
and the X-Error-Code header huggingface_hub turns into RepositoryNotFoundError,
RevisionNotFoundError, EntryNotFoundError or GatedRepoError. Tests point the
real client at it with HF_ENDPOINT. It can also break a download on purpose:
cut the connection mid-file (then stay down, or not) or stall mid-file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch
from safetensors.torch import load_file, save_file

LFS_SUFFIXES = (".safetensors", ".bin")  # served like the Hub serves LFS files: ETag is the sha256
INFO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
RESOLVE_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")


@dataclass
class Repo:
    """A model repo at a single commit, reachable as `main` and as tag `v1.0`."""

    repo_id: str
    files: dict[str, bytes]
    token: str | None = None  # set: the repo is gated and needs "Authorization: Bearer <token>"
    sha: str = field(init=False)

    def __post_init__(self):
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        self.sha = digest.hexdigest()

    def commit(self, revision: str) -> str | None:
        return self.sha if revision in ("main", "v1.0", self.sha) else None

    def etag(self, name: str) -> str:
        data = self.files[name]
        if name.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the git blob id

    def sibling(self, name: str) -> dict:
        entry = {"rfilename": name, "size": len(self.files[name]), "blobId": self.etag(name)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"size": len(self.files[name]), "sha256": self.etag(name), "pointerSize": 134}
        return entry


@dataclass
class Seen:
    """One request the server answered."""

    method: str
    path: str
    range: str | None
    status: int = 0


@dataclass
class Break:
    """What to do to the next GET of a file: send `after` bytes of it, then `then`."""

    after: int
    then: str  # "drop": close the connection; "outage": close it and answer 503 until restore(); "stall": hang until restore()


class FakeHub:
    """The Hub on 127.0.0.1; use as a context manager, then `url` is its endpoint."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self.breaks: dict[tuple[str, str], Break] = {}
        self.down = False
        self.stalled = threading.Event()  # set once a stalled GET has sent its first bytes
        self.released = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, directory: Path, *, token: str | None = None) -> Repo:
        """Serve the files of `directory` (top level) as repo `repo_id`."""
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        self.repos[repo_id] = Repo(repo_id, files, token)
        return self.repos[repo_id]

    def break_next(self, repo_id: str, name: str, *, after: int, then: str) -> None:
        self.breaks[(repo_id, name)] = Break(after, then)

    def restore(self) -> None:
        self.down = False
        self.released.set()

    def gets(self, name: str) -> list[Seen]:
        """The GET requests for a file (any repo, any revision)."""
        return [s for s in self.seen if s.method == "GET" and s.path.endswith(f"/{name}")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub: FakeHub = self.server.hub
        path = urlsplit(self.path).path
        seen = Seen(self.command, unquote(path), self.headers.get("Range"))
        hub.seen.append(seen)
        if hub.down:
            seen.status = self._error(503, None, "Service Unavailable")
        elif match := INFO_PATH.match(path):
            seen.status = self._model_info(hub, unquote(match["repo"]), unquote(match["revision"] or "main"))
        elif match := RESOLVE_PATH.match(path):
            seen.status = self._resolve(hub, unquote(match["repo"]), unquote(match["revision"]), unquote(match["file"]), body)
        else:
            seen.status = self._error(404, None, "Not Found")

    def _model_info(self, hub: FakeHub, repo_id: str, revision: str) -> int:
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        sha = repo.commit(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        info = {
            "id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "gated": "manual" if repo.token else False,
            "siblings": [repo.sibling(name) for name in sorted(repo.files)],
        }
        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, hub: FakeHub, repo_id: str, revision: str, name: str, body: bool) -> int:
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            status = 403 if self.headers.get("Authorization") else 401
            return self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
        sha = repo.commit(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": sha})
        data, status, headers = self._ranged(repo.files[name])
        headers.update({"X-Repo-Commit": sha, "ETag": f'"{repo.etag(name)}"', "Content-Type": "application/octet-stream"})
        broken = hub.breaks.pop((repo_id, name), None) if body else None
        if broken is None:
            return self._send(status, data if body else b"", headers, length=len(data))
        self._send_headers(status, headers, len(data))
        self.wfile.write(data[: broken.after])
        self.wfile.flush()
        if broken.then == "stall":
            hub.stalled.set()
            hub.released.wait(30)
        hub.down = broken.then == "outage"
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client hung up first
            pass
        return status

    def _ranged(self, data: bytes) -> tuple[bytes, int, dict[str, str]]:
        """The part of `data` a Range header asks for (bytes=start- or bytes=start-end), with status and headers."""
        headers = {"Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if not match:
            return data, 200, headers
        start, end = int(match[1]), int(match[2] or len(data) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return data[start : end + 1], 206, headers

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> int:
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        headers["Content-Type"] = "application/json"
        return self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> int:
        self._send_headers(status, headers, len(data) if length is None else length)
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _send_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()


def closed_port_url() -> str:
    """An endpoint nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# Variants of the factory's tiny model, for repos and folders.


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def make_sharded(directory: Path) -> Path:
    """Re-save model.safetensors as two shards with a model.safetensors.index.json, the way transformers shards."""
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, directory / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in shard_names})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "model.safetensors").unlink()
    return directory


def make_bin_only(directory: Path) -> Path:
    """Replace model.safetensors by pytorch_model.bin, as older checkpoints ship."""
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


def add_padding(directory: Path, mib: int) -> Path:
    """Grow model.safetensors by an unused tensor: huggingface_hub reads a download in 10 MiB chunks, so only
    a longer file can be cut off and resumed part-way."""
    tensors = load_file(directory / "model.safetensors")
    tensors["padding"] = torch.zeros(mib * 2**18)  # float32, 4 bytes each
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def set_model_type(directory: Path, model_type: str, architectures: list[str]) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, architectures=architectures)
    (directory / "config.json").write_text(json.dumps(config))
