"""Hand-built torch zip files and pickles for the hostile-file tests: raw entries, compression bombs, global calls."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Hostile files


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style zip archive around an arbitrary ``data.pkl`` (for crafting hostile files)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def write_raw_zip(path: Path, entries: list[tuple[str, int, bytes, int]]) -> Path:
    """A zip written byte by byte from (name, method, compressed data, declared size) entries.

    For archives zipfile will not write: a data.pkl that inflates to gigabytes from a small file. The CRC of a
    compressed entry is left 0; nothing reads that far.
    """
    out, central = bytearray(), bytearray()
    for name, method, data, size in entries:
        raw = name.encode()
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0, crc, len(data), size)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(raw), 0, 0, 0, 0, 0, len(out)) + raw
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(raw), 0) + raw + data
    eocd = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    path.write_bytes(bytes(out + central) + b"PK\x05\x06" + eocd)
    return path


def deflated_zeros(size: int, chunk: int = 1 << 20) -> bytes:
    """A raw deflate stream of ``size`` zero bytes, built from one flushed chunk repeated (a zip bomb's body)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(bytes(chunk))
    c.flush(zlib.Z_FULL_FLUSH)  # after a full flush the compressor is reset: each chunk compresses the same
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (size // chunk) + c.flush()


def write_compressed_torch_zip(path: Path, data_pkl: bytes, compression: int, corrupt: bool = False) -> Path:
    """A torch zip whose data.pkl is compressed (deflate or LZMA), optionally with its compressed bytes damaged."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl, compress_type=compression)
        z.writestr("archive/version", "3\n")
    if corrupt:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("archive/data.pkl")
        raw = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        for i in range(start + info.compress_size // 3, start + 2 * info.compress_size // 3):
            raw[i] ^= 0x5A
        path.write_bytes(bytes(raw))
    return path


def global_call_pickle(module: str, name: str, *args: Any) -> bytes:
    """Protocol-2 bytes for ``{'model': module.name(*args)}``: GLOBAL + REDUCE, written by hand."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.dump(args)
    body = buf.getvalue()[2:-1]  # the args tuple without PROTO and STOP
    return (
        b"\x80\x02}X\x05\x00\x00\x00model"
        + pickle.GLOBAL
        + f"{module}\n{name}\n".encode()
        + body
        + pickle.REDUCE
        + pickle.SETITEM
        + pickle.STOP
    )
