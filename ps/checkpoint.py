"""Checkpoint files of the parameter server: atomic, checksummed, never loaded half.

A file is MAGIC, the payload's length (8 bytes, little endian) and SHA-256 (32 bytes),
then the payload: one torch.save of a dict of tensors, numbers, strings, bytes and
containers of them. It is written to a temporary file, fsynced, renamed over its final
name and the folder fsynced, so a crash leaves either the old set of files or the new
one. Loading checks the length and the checksum before unpickling anything, and unpickles
with weights_only=True, so a corrupted or hostile file is refused, never half-applied.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from pathlib import Path

import torch

MAGIC = b"FREEZEPS-CKPT-1\n"
_HEADER = struct.Struct("<Q32s")
_NAME = re.compile(r"^ckpt-(\d{9})\.fzck$")


class CheckpointError(Exception):
    """No usable checkpoint: missing, truncated, corrupted, or not a freezeps checkpoint."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.fzck"


def write_checkpoint(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `step` (rounds applied); keep the newest `keep` files."""
    if keep < 1:
        raise ValueError("keep at least one checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    final = checkpoint_path(directory, step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(_HEADER.pack(len(payload), hashlib.sha256(payload).digest()))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    # The file just written is this run's newest state whatever its step: never rotated away,
    # even by a file of a higher step (one set aside at a resume is renamed, see set_aside).
    for old in [p for p in list_checkpoints(directory) if p != final][keep - 1:]:
        old.unlink(missing_ok=True)
    return final


def set_aside(path: Path) -> Path:
    """Rename a refused checkpoint to `<name>.refused`: kept to look at, no longer one of the
    folder's checkpoints (a resumed run's rotation would otherwise count it as the newest)."""
    aside = path.with_name(path.name + ".refused")
    os.replace(path, aside)
    return aside


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_checkpoint(path: Path) -> dict:
    """The state in `path`, or CheckpointError saying what is wrong with the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a freezeps checkpoint (bad magic)")
    start = len(MAGIC) + _HEADER.size
    if len(data) < start:
        raise CheckpointError(f"{path}: truncated header ({len(data)} bytes)")
    length, digest = _HEADER.unpack_from(data, len(MAGIC))
    payload = memoryview(data)[start:]
    if len(payload) != length:
        raise CheckpointError(f"{path}: truncated: payload holds {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # the checksum matched, so this is a file we did not write
        raise CheckpointError(f"{path}: unreadable payload: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: payload is a {type(state).__name__}, not a dict")
    return state


def read_latest(directory: Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest good checkpoint in `directory`: (path, state, each newer one refused and why)."""
    refused: list[tuple[Path, str]] = []
    for path in list_checkpoints(directory):
        try:
            return path, read_checkpoint(path), refused
        except CheckpointError as e:
            refused.append((path, str(e)))
    if not refused:
        raise CheckpointError(f"no checkpoint in {directory}")
    raise CheckpointError(f"no good checkpoint in {directory}: " + "; ".join(why for _, why in refused))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
