"""Read nnU-Net checkpoints without unpickling arbitrary objects, and write them atomically.

``torch.load(..., weights_only=True)`` refuses nnU-Net's trainer checkpoints
because the trainer stores numpy scalars (``_best_ema``, the logged Dice and
losses). :data:`NNUNET_SAFE_GLOBALS` allows exactly the numpy scalar and dtype
types those entries need, and nothing else.

Every temp file the project writes beside a target is named by :func:`temp_path`
(``.<target>.<writer pid>-<random>.tmp``): a writer killed mid-write leaves one
behind, and :func:`remove_orphan_temp_files` removes those whose writer is gone.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from flwr_nnunet.errors import FlwrNnUNetError

__all__ = [
    "NNUNET_SAFE_GLOBALS",
    "CheckpointError",
    "RepairRefused",
    "atomic_save",
    "atomic_write",
    "fsync_directory",
    "load_checkpoint",
    "remove_orphan_temp_files",
    "split_checkpoint",
    "temp_path",
]

_scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
_dtype_classes = (
    [getattr(np.dtypes, name) for name in ("Float32DType", "Float64DType")] if hasattr(np, "dtypes") else []
)

NNUNET_SAFE_GLOBALS: list[Any] = [
    (_scalar, "numpy._core.multiarray.scalar"),
    (_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *_dtype_classes,
]
"""The globals an nnU-Net trainer checkpoint needs besides tensors: numpy's scalar
constructor (under its numpy 2 and numpy 1 names), ``numpy.dtype`` and the float32 /
float64 dtype classes of the logged metrics and ``_best_ema``."""

_LOAD_ERRORS = (
    RuntimeError,  # zip reader errors
    ValueError,  # includes UnicodeDecodeError from a corrupt pickle
    EOFError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)
"""What ``torch.load`` raises for corrupt or disallowed content (it has no single error type)."""
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_WEIGHTS_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.(?P<pid>\d+)-[A-Za-z0-9_]+" + re.escape(_TEMP_SUFFIX))


class CheckpointError(FlwrNnUNetError):
    """A file is not a readable nnU-Net checkpoint or state_dict; the message is one line."""


class RepairRefused(CheckpointError):
    """A checkpoint was read but cannot be repaired safely as asked; the message is one line."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_container_format(path: Path) -> None:
    """Raise CheckpointError unless ``path`` starts like a ``torch.save`` file and is complete."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a PyTorch checkpoint")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is a truncated or corrupt PyTorch checkpoint (the zip archive has no central directory)"
            )
        return
    if head != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with bytes {head[:4].hex(' ')}, "
            "not a torch.save zip archive or legacy file)"
        )


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file safely: ``weights_only=True`` plus :data:`NNUNET_SAFE_GLOBALS`, on the CPU.

    Parameters
    ----------
    path
        The checkpoint file.

    Raises
    ------
    CheckpointError
        One line saying why the file cannot be read: missing, empty, truncated,
        not a PyTorch file, corrupt, or holding objects outside the allow-list.
    """
    path = Path(path)
    _check_container_format(path)
    try:
        with torch.serialization.safe_globals(NNUNET_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except _LOAD_ERRORS as error:
        message = str(error)
        unsafe = _WEIGHTS_ERROR.search(message)
        if unsafe:
            reason = f"it holds objects that are not allowed to be unpickled ({_one_line(unsafe.group(1))})"
        else:
            reason = f"{type(error).__name__}: {_one_line(message) or 'no details'}"
        raise CheckpointError(f"cannot load {path}: {reason}") from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def split_checkpoint(
    obj: Any, path: str | os.PathLike = "checkpoint"
) -> tuple[Mapping[str, torch.Tensor], dict | None]:
    """The network weights of a loaded checkpoint, and the checkpoint dict that holds them.

    Parameters
    ----------
    obj
        What :func:`load_checkpoint` returned.
    path
        The file it came from (for error messages).

    Returns
    -------
    tuple
        ``(state_dict, container)``: for an nnU-Net checkpoint (trainer or
        global) ``container`` is the whole dict and ``state_dict`` its
        ``network_weights``; for a plain state_dict ``container`` is None.

    Raises
    ------
    CheckpointError
        If ``obj`` is neither an nnU-Net checkpoint nor a non-empty state_dict.
    """
    if isinstance(obj, Mapping) and "network_weights" in obj:
        weights = obj["network_weights"]
        if not _is_state_dict(weights) or not weights:
            raise CheckpointError(f"{path}: 'network_weights' is not a non-empty mapping of key -> tensor")
        return weights, dict(obj)
    if _is_state_dict(obj) and obj:
        return obj, None
    if isinstance(obj, Mapping):
        odd = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        what = "an empty dict" if not obj else f"a dict without 'network_weights' (entry {odd!r} is not a tensor)"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(f"{path} is not an nnU-Net checkpoint or state_dict: it holds {what}")


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh name for a temp file beside ``path``, in the project's pattern (this process's pid in it)."""
    path = Path(path)
    return path.with_name(f"{_temp_prefix(path)}{uuid.uuid4().hex}{_TEMP_SUFFIX}")


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True where that cannot be told: not POSIX)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_orphan_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files in ``folder`` (not below it) that a writer killed mid-write left behind.

    Only names of the project's pattern (:func:`temp_path`) whose writer process no longer runs are removed:
    a temp file another live process is writing stays, and so does every other file.

    Parameters
    ----------
    folder
        A folder the project writes into atomically (a model folder, a site's results folder); may not exist.

    Returns
    -------
    list of Path
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        found = _TEMP_NAME.fullmatch(entry.name)
        if found is None or _running(int(found["pid"])) or not entry.is_file():
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``path`` atomically through ``write(file)``: a temp file in the same folder, fsync, rename.

    Parameters
    ----------
    path
        The destination; readers see either the old file or the complete new one.
    write
        Writes the content into the open binary file it is given.
    check
        Optional function called with the temp file's path after it is written
        and synced; if it raises, the temp file is removed and ``path`` is untouched.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, _default_mode())
        if check is not None:
            check(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike, *, check: Callable[[Path], None] | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f), check=check)
