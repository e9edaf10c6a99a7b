"""Atomic writes that every layer uses: a file, or a whole folder, appears complete or not at all.

A folder is built in a hidden sibling (:func:`temp_dir`: ``.NAME.XXXXXXXX``) and renamed over the
destination (:func:`replace_dir`). A process killed in between leaves that sibling behind;
:func:`clear_stale_temps` removes such leftovers (only names these helpers create)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path

# tempfile.mkdtemp's random part: 8 characters of this alphabet
_RANDOM = r"[a-z0-9_]{8}"


def temp_dir(dest: str | os.PathLike) -> Path:
    """A new, empty hidden folder beside ``dest`` to build its next version in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder to ``dest``, replacing what was there (a folder or a file)."""
    if dest.exists() or dest.is_symlink():
        # the old version goes into a fresh hidden folder first, so the swap never touches a
        # name the user may own (a fixed ".NAME.old" could be theirs)
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        try:
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Hidden folders beside ``dest`` that :func:`temp_dir` or :func:`replace_dir` created for it
    (``.NAME.XXXXXXXX``, ``.NAME.old.XXXXXXXX``, and ``.NAME.old`` from older versions)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(dest.name)}\.(?:old\.{_RANDOM}|old|{_RANDOM})")
    return sorted(p for p in dest.parent.iterdir()
                  if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def clear_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove what a build of ``dest`` killed midway left beside it; returns the folders removed.
    Call it only where no other process is building ``dest`` at the same time."""
    removed = stale_temps(dest)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to print in a one-line message: control characters (a binary file's bytes,
    terminal escapes) written as escapes such as ``\\x00``; cut to ``limit`` characters."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   (c.encode("unicode_escape").decode("ascii") if unicodedata.category(c)[0] == "C" else c)
                   for c in text)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
