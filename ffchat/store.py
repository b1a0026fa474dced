"""ffchat's model store: one small directory of records, never a copy of weights.

A record says where a model's files are (a Hub snapshot in the shared Hugging
Face cache, a local folder, or a GGUF file) and holds what ffchat derived from
it (a GGUF's config and tokenizer, later the INT4 artifact). Every write goes
to a temporary directory that is renamed into place, so a crash or Ctrl+C never
leaves a record a later run would trust.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ffchat.errors import FfchatError

RECORD_FILE = "model.yaml"


def ffchat_home() -> Path:
    """The store root: $FFCHAT_HOME, else $XDG_CACHE_HOME/ffchat, else ~/.cache/ffchat."""
    if os.environ.get("FFCHAT_HOME"):
        return Path(os.environ["FFCHAT_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "ffchat"


@dataclass
class FileEntry:
    name: str
    size: int


@dataclass
class ModelRecord:
    """What the store knows about one model."""

    name: str
    source: str  # "hub", "folder" or "gguf"
    location: str  # the Hub snapshot dir, the local folder, or the GGUF file
    weights_format: str  # "safetensors", "bin" or "gguf"
    files: list[FileEntry] = field(default_factory=list)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    record_dir: Path | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def model_dir(self) -> Path:
        """The directory holding config.json and the tokenizer files."""
        if self.source == "gguf":
            assert self.record_dir is not None
            return self.record_dir
        return Path(self.location)

    def to_yaml(self) -> str:
        data = asdict(self)
        data.pop("record_dir")
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, record_dir: Path) -> "ModelRecord":
        data = yaml.safe_load(text)
        data["files"] = [FileEntry(**f) for f in data.get("files", [])]
        return cls(**data, record_dir=record_dir)


def replace_directory(staging: Path, final: Path) -> None:
    """Rename a fully written ``staging`` directory to ``final``; an old ``final`` is moved aside, then deleted."""
    if not final.exists():
        staging.rename(final)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.trash-", dir=final.parent))
    final.rename(trash / "old")
    staging.rename(final)
    shutil.rmtree(trash, ignore_errors=True)


def slug(name: str) -> str:
    """A directory name for a model name ("org/model" -> "org--model")."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name.replace("/", "--"))


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else ffchat_home()
        self.models_dir = self.root / "models"

    def ensure_writable(self) -> None:
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.models_dir):
                pass
        except OSError as exc:
            raise FfchatError(
                f"the model store {self.root} is not writable: {exc.strerror or exc}",
                hint="set FFCHAT_HOME to a writable directory",
            ) from exc

    def save(self, record: ModelRecord, derived_files: dict[str, bytes] | None = None) -> ModelRecord:
        """Write a record (and files derived from the model) atomically, replacing any old one."""
        self.ensure_writable()
        final = self.models_dir / slug(record.name)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.models_dir))
        try:
            for rel, data in (derived_files or {}).items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(data)
            (staging / RECORD_FILE).write_text(record.to_yaml())
            replace_directory(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        record.record_dir = final
        return record

    def list(self) -> list[ModelRecord]:
        if not self.models_dir.is_dir():
            return []
        records = []
        for entry in sorted(self.models_dir.iterdir()):
            if entry.name.startswith(".") or not (entry / RECORD_FILE).is_file():
                continue
            records.append(self._read(entry))
        return records

    def find(self, name: str) -> ModelRecord | None:
        """Look a model up by exact name, case-insensitively, or by the part after "org/"."""
        records = self.list()
        for match in (
            lambda r: r.name == name,
            lambda r: r.name.lower() == name.lower(),
            lambda r: r.name.lower().split("/")[-1] == name.lower(),
        ):
            found = [r for r in records if match(r)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = ", ".join(r.name for r in found)
                raise FfchatError(f"{name!r} is ambiguous: {names}")
        return None

    def get(self, name: str) -> ModelRecord:
        record = self.find(name)
        if record is None:
            raise FfchatError(f"model {name!r} not found", hint=f"run `ffchat pull {name}` first, or see `ffchat list`")
        return record

    def remove(self, record: ModelRecord) -> None:
        assert record.record_dir is not None
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.models_dir))
        record.record_dir.rename(trash / "old")
        shutil.rmtree(trash, ignore_errors=True)

    def _read(self, record_dir: Path) -> ModelRecord:
        try:
            return ModelRecord.from_yaml((record_dir / RECORD_FILE).read_text(), record_dir)
        except (OSError, yaml.YAMLError, TypeError) as exc:
            raise FfchatError(f"the store record {record_dir} is damaged: {exc}", hint="remove that directory") from exc
