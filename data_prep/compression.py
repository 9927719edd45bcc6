"""Open an input file as a stream of its decompressed bytes: gzip, bzip2, xz/lzma, zstd, or none.

The format comes from the file's first bytes (its magic number) where they name one, else from its
suffix: a ``.jsonl`` that is really gzip reads decompressed, and a ``.gz`` that is not gzip is
reported as damaged instead of read as garbage. Everything streams (nothing is decompressed to disk
or held whole in memory). A truncated or damaged stream raises one of :data:`DECODE_ERRORS` while
being read; :meth:`InputStream.describe` says what broke and where.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from pathlib import Path

import zstandard

SUPPORTED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".lzma": "xz", ".zst": "zstd", ".zstd": "zstd"}
SUPPORTED_TEXT = "gzip (.gz), bzip2 (.bz2), xz (.xz, .lzma) and zstd (.zst)"
# Formats we recognise but cannot stream, by suffix. (.tgz / .tar.gz decompress to a tar: binary.)
UNSUPPORTED = {".zip": "zip", ".lz4": "lz4", ".7z": "7-Zip", ".br": "brotli", ".lz": "lzip", ".rar": "RAR",
               ".z": "Unix compress", ".sz": "snappy", ".snappy": "snappy", ".lzo": "lzop"}
_UNSUPPORTED_MAGIC = {b"PK\x03\x04": "zip", b"\x04\x22\x4d\x18": "lz4", b"7z\xbc\xaf\x27\x1c": "7-Zip",
                      b"Rar!\x1a\x07": "RAR", b"\x1f\x9d": "Unix compress", b"LZIP": "lzip"}
_MAGIC_PROBE = 10

# What the decoders raise on a truncated or damaged stream (checked on this machine: gzip/bz2/xz raise
# EOFError at a truncation; gzip BadGzipFile (an OSError) or zlib.error, bz2 OSError, lzma LZMAError
# on damage; zstd ZstdError, and our own EOFError below).
DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
# Where each format checks its data: damage in the middle is only found there (bytes decoded before it
# come out garbled), while a truncation is found exactly where the file ends.
CHECKSUM_SCOPE = {"gzip": "its CRC once, at the end of the file", "bzip2": "a CRC per 900 kB block",
                  "xz": "a CRC per block", "zstd": "a checksum per frame, if the frame has one"}


class UnsupportedCompression(Exception):
    """The file is compressed in a format we cannot read (``.name`` says which)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class NotCompressedAsNamed(Exception):
    """The suffix names a compression the file's first bytes do not have."""


def split_suffix(name: str) -> tuple[str, str | None]:
    """``"a.jsonl.zst"`` -> ``("a.jsonl", ".zst")``; a name without a compression suffix -> ``(name, None)``."""
    suffix = Path(name).suffix.lower()
    if suffix in SUPPORTED or suffix in UNSUPPORTED:
        return name[: -len(suffix)], suffix
    return name, None


def _magic_format(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    # "BZh" is ASCII, so also require the level digit and a block or end-of-stream magic after it.
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2"
    return None


def detect(path: Path, sniff_unsupported: bool = False) -> str | None:
    """The compression of ``path`` (``"gzip"``, ``"bzip2"``, ``"xz"``, ``"zstd"``) or None.

    Raises :class:`UnsupportedCompression` for a format named by the suffix we cannot read (or, with
    ``sniff_unsupported``, one recognised by its magic: only for files that must be text, since a
    ``.jar`` or ``.docx`` in a source tree is a zip too and is reported as a binary file instead),
    and :class:`NotCompressedAsNamed` for a non-empty ``.gz`` (...) whose bytes are not that format."""
    with open(path, "rb") as f:
        head = f.read(_MAGIC_PROBE)
    found = _magic_format(head)
    if found:
        return found
    _, suffix = split_suffix(path.name)
    if suffix in UNSUPPORTED:
        raise UnsupportedCompression(UNSUPPORTED[suffix])
    if sniff_unsupported:
        for magic, name in _UNSUPPORTED_MAGIC.items():
            if head.startswith(magic):
                raise UnsupportedCompression(name)
    if suffix in SUPPORTED and head and SUPPORTED[suffix] != "xz":  # legacy .lzma has no magic number
        raise NotCompressedAsNamed(f"named {suffix} but its first bytes ({head[:6].hex(' ')}) are not "
                                   f"{SUPPORTED[suffix]} data")
    return "xz" if suffix == ".lzma" else None


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decoder that notices a truncated file.

    zstandard's ``stream_reader`` returns the data of a cut-off frame and then a clean end of file
    (checked with zstandard 0.25), so frames are decoded with ``decompressobj`` and a file that ends
    inside a frame raises EOFError, as gzip, bz2 and lzma do. Consecutive frames are read in turn.
    ``max_window_size`` 2**31 accepts files written with ``zstd --long=31``."""

    _CHUNK = 1 << 16  # compressed bytes per step: text decodes to a few times that (ratio 3-10)

    def __init__(self, fp):
        super().__init__()
        self._fp = fp
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._obj = None  # the frame being decoded; None at a frame boundary
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            chunk = self._fp.read(self._CHUNK)
            if not chunk:
                if self._obj is not None:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            out.append(self._obj.decompress(chunk))
            if self._obj.eof:
                chunk, self._obj = self._obj.unused_data, None
            else:
                chunk = b""
        return b"".join(out)


class InputStream:
    """``with InputStream(path) as s: s.file.readline()``: the decompressed bytes of ``path``.

    ``s.format`` is the compression (None: plain); ``s.progress()`` the bytes of the file on disk
    consumed so far (for a progress bar and for messages)."""

    def __init__(self, path: Path, sniff_unsupported: bool = False):
        self.path = Path(path)
        self.format = detect(self.path, sniff_unsupported)
        self.size = self.path.stat().st_size
        self._raw = open(self.path, "rb")
        try:
            self.file = self._open(self.format)
        except BaseException:
            self._raw.close()
            raise

    def _open(self, fmt: str | None):
        if fmt is None:
            return self._raw
        if fmt == "gzip":
            return gzip.GzipFile(fileobj=self._raw, mode="rb")
        if fmt == "bzip2":
            return bz2.BZ2File(self._raw, "rb")
        if fmt == "xz":
            return lzma.LZMAFile(self._raw, "rb")  # FORMAT_AUTO: .xz and legacy .lzma
        return io.BufferedReader(_ZstdReader(self._raw), buffer_size=1 << 16)

    def progress(self) -> int:
        return self.file.tell() if self.format is None else self._raw.tell()

    def describe(self, exc: BaseException) -> str:
        """What a decode error means, with where it happened in the file on disk."""
        what = self.format or "file"
        if isinstance(exc, EOFError):
            return f"{what} data ends early: the file is truncated ({self.size:,} bytes on disk)"
        return f"{what} data is damaged near byte {self._raw.tell():,} of {self.size:,} ({str(exc) or type(exc).__name__})"

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self._raw.close()

    def __enter__(self) -> "InputStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
