"""Disk.open as typed code uses a file: checked by mypy --strict, and run by pytest."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import zipfile
from typing import BinaryIO, cast

import shmdisk
from shmdisk._fileio import open_disk
from shmdisk.testing import unique_name


def test_disk_open_is_a_typed_binary_file() -> None:
    """The file from Disk.open fits shutil, tarfile, zipfile, hashlib and io.TextIOWrapper."""
    name = unique_name("typing-fileio")
    disk = shmdisk.create(name, 256)
    try:
        with disk.open("r+b") as f:
            written: int = f.write(b"abc")
            where: int = f.seek(0, os.SEEK_SET)
            data: bytes = f.read(written)
            assert (where, data) == (0, b"abc")
            shutil.copyfileobj(io.BytesIO(b"more"), f)
        with disk.open("wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            tar.addfile(tarfile.TarInfo("empty"))
        with disk.open("r+b") as f, zipfile.ZipFile(f, "w") as zf:
            zf.writestr("a", b"a")
        with disk.open("rb") as f:
            # typing.BinaryIO does not declare readinto, which file_digest wants; the object has it.
            digest = hashlib.file_digest(cast("io.BufferedReader", f), "sha256")
            assert len(digest.hexdigest()) == 64
        with disk.open("r+b") as f:
            text = io.TextIOWrapper(f, encoding="utf-8")
            text.write("typed")
            text.flush()
            text.detach()
        raw: BinaryIO = open_disk(disk, "rb", buffering=0)
        raw.close()
    finally:
        disk.disconnect()
        shmdisk.destroy(name)
