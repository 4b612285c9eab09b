"""Measured layer latencies, keyed by everything that decides them, cached in one JSON file.

A key (:class:`LatencyKey`) names the hardware, the software, the number
type, the threads, the backend and the layer's exact geometry and input
shape; its value is the dense layer's time and the factored form's time at
each measured rank. The same key measured once serves every layer of that
shape in every model, run after run.

The file (``$FXDECO_CACHE_DIR/latency.json``, else ``~/.cache/fxdeco/latency.json``)
is only ever replaced whole: new measurements are merged into what is on disk
at the time of writing and written through a temporary file and
``os.replace``, so a crash or a second process never leaves half a file. A
file that cannot be read as a latency table is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch

from fxdeco.errors import warn_user
from fxdeco.latency.allocator import allocator_tag
from fxdeco.latency.timing import as_device, device_name

log = logging.getLogger(__name__)

FORMAT = "fxdeco.latency"
VERSION = 1
FILE_NAME = "latency.json"
BACKENDS = ("eager", "inductor")
KINDS = ("linear", "conv2d")

PathArg = Union[str, "os.PathLike[str]", bool, None]


def _pair(value: Any) -> tuple[int, int] | str:
    """A conv's stride/padding/dilation as a pair (``"same"``/``"valid"`` padding stays a string)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _dims(shape: Any) -> str:
    return "x".join(str(int(d)) for d in shape)


@dataclasses.dataclass(frozen=True)
class LatencyKey:
    """Everything a layer's measured time depends on.

    ``threads`` is ``torch.get_num_threads()`` for CPU measurements and 0 on
    accelerators (where it does not change a kernel's time). ``channels_last``
    is the memory format of a conv's input. Stride, padding and dilation are
    normalised to pairs for convs and to ``(1, 1)``, ``(0, 0)``, ``(1, 1)`` for
    linears. :meth:`__str__` is the stable form used in the cache file.
    ``device`` names the hardware and, on a CPU whose allocator is not the C
    library's default, that allocator (:func:`fxdeco.latency.allocator.allocator_tag`).

    Example:
        >>> key = LatencyKey("cpu:Some CPU", "2.5.0", "float32", 2, "eager", "linear", (512, 256), (64, 256))
        >>> str(key)
        'linear w=512x256 x=64x256 s=1x1 p=0x0 d=1x1 bias=1 | float32 eager threads=2 | cpu:Some CPU | torch 2.5.0'
        >>> LatencyKey.parse(str(key)) == key
        True
    """

    device: str
    torch_version: str
    dtype: str
    threads: int
    backend: str
    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "weight_shape", tuple(int(d) for d in self.weight_shape))
        set_(self, "input_shape", tuple(int(d) for d in self.input_shape))
        set_(self, "stride", _pair(self.stride))
        set_(self, "padding", _pair(self.padding))
        set_(self, "dilation", _pair(self.dilation))
        set_(self, "threads", int(self.threads))

    def __str__(self) -> str:
        padding = self.padding if isinstance(self.padding, str) else _dims(self.padding)
        layer = (f"{self.kind} w={_dims(self.weight_shape)} x={_dims(self.input_shape)} s={_dims(self.stride)} "
                 f"p={padding} d={_dims(self.dilation)} bias={int(self.bias)}"
                 + (" channels_last" if self.channels_last else ""))
        return (f"{layer} | {self.dtype} {self.backend} threads={self.threads} | {self.device} "
                f"| torch {self.torch_version}")

    @classmethod
    def parse(cls, text: str) -> LatencyKey:
        """The key whose :meth:`__str__` is ``text`` (ValueError when it is not one)."""
        try:
            layer, run, device, version = (part.strip() for part in text.split(" | "))
            kind, *fields = layer.split()
            values = dict(f.split("=", 1) for f in fields if "=" in f)
            dtype, backend, threads = run.split()

            def dims(s: str) -> tuple[int, ...]:
                return tuple(int(d) for d in s.split("x"))

            padding = values["p"]
            return cls(device, version.removeprefix("torch "), dtype, int(threads.removeprefix("threads=")), backend,
                       kind, dims(values["w"]), dims(values["x"]), dims(values["s"]),
                       padding if padding in ("same", "valid") else dims(padding), dims(values["d"]),
                       values["bias"] == "1", "channels_last" in fields)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"not a latency key: {text!r}") from exc

    @classmethod
    def here(cls, device: torch.device | str | None, dtype: torch.dtype, backend: str, **layer: Any) -> LatencyKey:
        """A key for this machine, this torch and the current thread count; ``layer`` gives the layer fields.

        Example:
            >>> key = LatencyKey.here("cpu", torch.float16, "eager", kind="linear", weight_shape=(4, 3),
            ...                       input_shape=(2, 3), bias=False)
            >>> key.dtype, key.threads == torch.get_num_threads(), key.torch_version == torch.__version__
            ('float16', True, True)
        """
        device = as_device(device)
        threads = torch.get_num_threads() if device.type == "cpu" else 0
        name = device_name(device)
        tag = allocator_tag() if device.type == "cpu" else ""
        return cls(f"{name}, {tag}" if tag else name, torch.__version__, str(dtype).removeprefix("torch."), threads,
                   backend, **layer)


@dataclasses.dataclass
class Entry:
    """The measured times of one key: the dense layer and the factored form by rank (seconds per call)."""

    dense: float | None = None
    factored: dict[int, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"dense": self.dense, "factored": {str(r): t for r, t in sorted(self.factored.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        dense = data.get("dense")
        factored = data.get("factored", {})
        if (dense is not None and not isinstance(dense, (int, float))) or not isinstance(factored, Mapping):
            raise ValueError("malformed entry")
        return cls(None if dense is None else float(dense), {int(r): float(t) for r, t in factored.items()})

    def merge(self, other: Entry) -> None:
        """Take ``other``'s measurements where it has them."""
        if other.dense is not None:
            self.dense = other.dense
        self.factored.update(other.factored)


def default_path() -> pathlib.Path:
    """Where the latency cache lives unless told otherwise: ``$FXDECO_CACHE_DIR`` or ``~/.cache/fxdeco``.

    Example:
        >>> default_path().name
        'latency.json'
    """
    folder = os.environ.get("FXDECO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxdeco")
    return pathlib.Path(folder) / FILE_NAME


class LatencyTable:
    """Measured latencies by :class:`LatencyKey`, kept in memory and (unless ``path`` is None/False) on disk.

    ``path``: True (default) for :func:`default_path`, a file path, or
    None/False for a table in memory only. The file is read once, here;
    :meth:`record` adds measurements and, with a file, merges them into it at
    once (so an interrupted probe keeps what it measured). Lookups never touch
    the disk.

    A file that is not valid JSON is ignored with a warning and replaced on the
    next write; a JSON file of another format or a newer version is ignored
    with a warning and never overwritten (the table stays in memory).

    Example:
        >>> table = LatencyTable(None)
        >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "linear", (8, 8), (4, 8))
        >>> table.record(key, dense=2e-6, factored={2: 1e-6})
        >>> table.dense(key), table.factored(key, 2), table.factored(key, 3)
        (2e-06, 1e-06, None)
    """

    def __init__(self, path: PathArg = True) -> None:
        if path is True:
            path = default_path()
        self.path: pathlib.Path | None = pathlib.Path(path) if path not in (None, False) else None
        self.entries: dict[LatencyKey, Entry] = {}
        if self.path is not None:
            entries, writable = self._read(self.path)
            self.entries = entries
            if not writable:
                self.path = None

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        return f"LatencyTable({len(self.entries)} keys, {where})"

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: LatencyKey) -> Entry | None:
        """The measurements of ``key``, or None."""
        return self.entries.get(key)

    def dense(self, key: LatencyKey) -> float | None:
        """The dense layer's seconds per call, or None when not measured."""
        entry = self.entries.get(key)
        return None if entry is None else entry.dense

    def factored(self, key: LatencyKey, rank: int) -> float | None:
        """The factored form's seconds per call at ``rank``, or None when not measured."""
        entry = self.entries.get(key)
        return None if entry is None else entry.factored.get(int(rank))

    def missing(self, key: LatencyKey, ranks: Any) -> tuple[bool, list[int]]:
        """Whether the dense time of ``key`` is missing, and which of ``ranks`` are (sorted, unique).

        Example:
            >>> key = LatencyKey("cpu:x", "2.5", "float32", 1, "eager", "linear", (8, 8), (4, 8))
            >>> LatencyTable(None).missing(key, [4, 2, 2])
            (True, [2, 4])
        """
        entry = self.entries.get(key) or Entry()
        return entry.dense is None, sorted({int(r) for r in ranks} - set(entry.factored))

    def record(self, key: LatencyKey, dense: float | None = None, factored: Mapping[int, float] | None = None) -> None:
        """Add measurements of ``key`` (replacing earlier ones of the same rank) and write them to the file."""
        new = Entry(dense, {int(r): float(t) for r, t in (factored or {}).items()})
        self.entries.setdefault(key, Entry()).merge(new)
        if self.path is not None:
            try:
                self._write({key: new})
            except OSError as exc:  # a read-only or full disk must not cost the measurements
                warn_user(f"cannot write the latency cache {str(self.path)!r} ({exc}); keeping measurements in "
                          "memory only")
                self.path = None

    # -- the file ------------------------------------------------------------------------------------------------

    @staticmethod
    def _read(path: pathlib.Path) -> tuple[dict[LatencyKey, Entry], bool]:
        """The entries in ``path`` (none if absent), and whether the file may be written."""
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (writing will say if it cannot)
            return {}, True
        except (OSError, UnicodeDecodeError) as exc:
            warn_user(f"latency cache {str(path)!r} cannot be read ({exc}); starting with an empty table, "
                      "which replaces it when written")
            return {}, True
        if not text.strip():
            return {}, True
        try:
            data = json.loads(text)
        except ValueError as exc:
            warn_user(f"latency cache {str(path)!r} is corrupt ({exc}); starting with an empty table, "
                      "which replaces it when written")
            return {}, True
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            warn_user(f"{str(path)!r} is not an fxdeco latency cache; ignoring it and keeping measurements in "
                      "memory only (pass another path, or delete the file)")
            return {}, False
        if data.get("version") != VERSION:
            warn_user(f"latency cache {str(path)!r} has version {data.get('version')!r}, this fxdeco reads "
                      f"version {VERSION}; ignoring it and keeping measurements in memory only")
            return {}, False
        entries: dict[LatencyKey, Entry] = {}
        bad = 0
        for text_key, value in data["entries"].items():
            try:
                entries[LatencyKey.parse(text_key)] = Entry.from_json(value)
            except (ValueError, TypeError, AttributeError):
                bad += 1
        if bad:
            warn_user(f"latency cache {str(path)!r}: skipped {bad} malformed entries")
        return entries, True

    def _write(self, new: Mapping[LatencyKey, Entry]) -> None:
        """Merge ``new`` into the file as it is now, replacing it atomically."""
        assert self.path is not None
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            on_disk, writable = self._read_quietly(path)
            if not writable:
                log.warning("latency cache %s became unwritable (another format); keeping measurements in memory",
                            path)
                self.path = None
                return
            for key, entry in new.items():
                on_disk.setdefault(key, Entry()).merge(entry)
            data = {"format": FORMAT, "version": VERSION,
                    "entries": {str(k): e.to_json() for k, e in sorted(on_disk.items(), key=lambda kv: str(kv[0]))}}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1)
                os.chmod(tmp, _ordinary_mode())  # mkstemp makes it private; a cache may be shared
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _read_quietly(self, path: pathlib.Path) -> tuple[dict[LatencyKey, Entry], bool]:
        """:meth:`_read` without repeating the warnings already given when the table was opened."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._read(path)


def _ordinary_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` where the platform has ``fcntl`` (two processes merging at once)."""
    try:
        import fcntl
    except ImportError:  # Windows: the rename is still atomic, a concurrent merge may lose the other's entries
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
