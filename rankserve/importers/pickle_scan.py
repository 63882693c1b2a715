"""Bounds on a hostile ``torch.save`` archive, checked before anything is built: the pickle stream scan, archive
entries read with a size cap, and tensor views that must not overlap or expand their storage.

The scan walks the pickle's opcodes without building anything (:func:`scan_pickle`): nesting depth, opcode
count and hashing work are bounded, so a hostile file fails with one line instead of a segfault (a tuple
nested 200,000 deep crashes CPython's ``hash``), a MemoryError or minutes of CPU.
"""

from __future__ import annotations

import _compat_pickle
import io
import lzma
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from rankserve.importers.errors import CheckpointImportError, UnsafePickleError

# Bounds on what one file may make the loader do. An honest ``data.pkl`` holds only metadata (the module tree,
# the config, the tokenizer state): a few MB, nested a few dozen levels, with small tuples as dict keys.
MAX_PICKLE_BYTES = 64 << 20  # data.pkl, inflated


MAX_DEPTH = 256  # container nesting; CPython's tuple hash recurses in C, with no recursion check


MAX_WORK = 1 << 26  # opcodes + elements hashed by the stream, and elements created by allowed calls


MAX_NDIM = 64  # tensor dimensions


MAX_VIEW_EXPANSION = 4  # elements of all views of one storage, per element the storage holds


# Storage class names as torch pickles them (``torch.serialization`` writes ``getattr(torch, "<X>Storage")``).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


DTYPE_NAMES = {
    name
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype) and not name.startswith("_")
}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hostile(source: str, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{source}: {what}; a model checkpoint never does this (the file is hostile or corrupt)"
    )


def py3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol 2 writes Python 2 names (``__builtin__ set``); the Python 3 name they stand for."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# Each stack value is summarised as (depth, weight, text): its container nesting, the elements a hash of it
# visits (a tuple hashes all its elements, recursively) and, for strings, the text (STACK_GLOBAL names).
# Summaries are immutable, so a list memoized before it was filled keeps its empty summary; that cannot hide
# a deep tuple, because only tuples hash recursively and a tuple is only ever built from summarised stack
# values (``builtins.tuple`` is not an allowed call).
_LEAF = (0, 1, None)


_MARK = pickletools.markobject


(_K_MARK, _K_POP, _K_PUT, _K_MEMOIZE, _K_GET, _K_DUP, _K_SAME, _K_LEAF, _K_NONE, _K_BUILD) = range(10)


# Opcodes that update the container below their arguments in place instead of pushing a new value.
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}


def _opcode_kind(op: pickletools.OpcodeInfo) -> int:
    name, before, after = op.name, op.stack_before, op.stack_after
    if name == "MARK":
        return _K_MARK
    if name == "POP":
        return _K_POP
    if name in ("PUT", "BINPUT", "LONG_BINPUT"):
        return _K_PUT
    if name == "MEMOIZE":
        return _K_MEMOIZE
    if name in ("GET", "BINGET", "LONG_BINGET"):
        return _K_GET
    if name == "DUP":
        return _K_DUP
    if name == "READONLY_BUFFER":
        return _K_SAME
    if not before:
        return _K_LEAF if after else _K_NONE
    return _K_BUILD


_OPCODES = {op.code: (op.name, _opcode_kind(op), op) for op in pickletools.opcodes}


def _hashed(name: str, fixed: list, sliced: list) -> list:
    """The values an opcode hashes: dict keys and set members; an allowed call may hash its arguments too."""
    if name == "SETITEM":
        return fixed[1:2]
    if name in ("SETITEMS", "DICT"):
        return sliced[0::2]
    if name in ("ADDITEMS", "FROZENSET"):
        return sliced
    if name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"):
        return fixed[1:] + sliced
    return []


def scan_pickle(stream: bytes | io.BufferedIOBase, source: str, allowed: Any = None) -> None:
    """Walk one pickle's opcodes without building anything; raise :class:`UnsafePickleError` if it is a bomb.

    The stack is simulated with a summary per value, so nesting beyond :data:`MAX_DEPTH` and hashing or opcode
    work beyond :data:`MAX_WORK` are refused before any object exists. ``allowed(module, name)`` (optional)
    vets every global the pickle names.
    """
    stack: list[tuple] = []
    marks: list[int] = []
    memo: dict[Any, tuple] = {}
    work = 0
    try:
        for op, arg, _pos in pickletools.genops(stream):
            work += 1
            name, kind, info = _OPCODES[op.code]
            if allowed is not None and name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                allowed(*py3_name(module, attr))
            if kind == _K_LEAF:
                if name in _STRING_OPS:
                    stack.append((0, 1, arg))
                elif isinstance(arg, int) and name.startswith("LONG"):  # re-hashed digit by digit
                    stack.append((0, 1 + arg.bit_length() // 64, None))
                else:
                    stack.append(_LEAF)
                continue
            if kind == _K_PUT:
                if len(stack) <= (marks[-1] if marks else 0):
                    raise ValueError("PUT on an empty stack")
                memo[arg] = stack[-1]
                continue
            if kind == _K_GET:
                if arg not in memo:
                    raise ValueError(f"memo key {arg} is missing")
                stack.append(memo[arg])
                continue
            if kind == _K_MARK:
                marks.append(len(stack))
                continue
            if kind == _K_NONE:
                continue
            floor = marks[-1] if marks else 0
            if kind == _K_POP:
                if len(stack) > floor:
                    stack.pop()
                elif marks:
                    marks.pop()  # the pure-Python unpickler pops a mark when the stack above it is empty
                else:
                    raise ValueError("POP on an empty stack")
                continue
            if kind in (_K_MEMOIZE, _K_DUP, _K_SAME):
                if len(stack) <= floor:
                    raise ValueError(f"{name} on an empty stack")
                if kind == _K_MEMOIZE:
                    memo[len(memo)] = stack[-1]
                elif kind == _K_DUP:
                    stack.append(stack[-1])
                continue
            work = _build(name, info, stack, marks, work, source, allowed)
    except CheckpointImportError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointImportError(f"{source}: malformed pickle: {e}") from None


def _build(name: str, op: Any, stack: list, marks: list, work: int, source: str, allowed: Any) -> int:
    """One opcode that consumes stack values: check and push the summary of what it builds; the new work total."""
    before = op.stack_before
    sliced: list = []
    if _MARK in before:
        if not marks:
            raise ValueError(f"{name} without a MARK")
        start = marks.pop()
        sliced = stack[start:]
        del stack[start:]
        n_fixed = len(before) - 2
    else:
        n_fixed = len(before)
    if n_fixed > len(stack) - (marks[-1] if marks else 0):
        raise ValueError(f"{name} on a stack too short")
    fixed = stack[len(stack) - n_fixed :]
    del stack[len(stack) - n_fixed :]
    for summary in _hashed(name, fixed, sliced):
        work += summary[1]
    if work > MAX_WORK:
        raise hostile(source, f"the pickle asks for more than {MAX_WORK:,} steps of work")
    if allowed is not None and name == "STACK_GLOBAL":
        allowed(*py3_name(str(fixed[0][2]), str(fixed[1][2])))
    if not op.stack_after:
        return work
    in_place = name in _IN_PLACE
    target = fixed[0] if in_place else _LEAF
    children = (fixed[1:] if in_place else fixed) + sliced
    depth, weight = target[0], target[1]
    if children:
        depth = max(depth, 1 + max(c[0] for c in children))
        # saturated, so shared sub-tuples that double at every level cannot grow a huge int
        weight = min(MAX_WORK + 1, weight + sum(c[1] for c in children))
        if depth > MAX_DEPTH:
            raise hostile(source, f"objects are nested more than {MAX_DEPTH} levels deep")
    stack.append((depth, weight, None))
    stack.extend(_LEAF for _ in op.stack_after[1:])
    return work


# What a damaged compressed entry raises (zipfile checks CRCs itself and raises BadZipFile).
CORRUPT_ENTRY = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError)


def read_entry(archive: zipfile.ZipFile, name: str, limit: int, source: str) -> bytes:
    """One archive entry, never inflating more than ``limit`` bytes; damage is a :class:`CheckpointImportError`."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointImportError(f"{source}: archive entry {name} is missing") from None
    if info.file_size > limit:
        raise CheckpointImportError(
            f"{source}: archive entry {name} inflates to {info.file_size:,} bytes, more than the "
            f"{limit:,} allowed (a zip bomb or not a model checkpoint)"
        )
    try:
        with archive.open(info) as f:
            return f.read(limit + 1)  # zipfile stops at the declared size; the cap is belt and braces
    except CORRUPT_ENTRY as e:
        raise CheckpointImportError(
            f"{source}: archive entry {name} is corrupt: {type(e).__name__}: {e}"
        ) from None
    except RuntimeError as e:  # encrypted entries
        raise CheckpointImportError(f"{source}: cannot read archive entry {name}: {e}") from None


def storage_bytes(archive: zipfile.ZipFile, entry: str, expected: int, source: str) -> bytes:
    """A tensor storage entry: stored uncompressed, as ``torch.save`` writes it, and exactly ``expected`` bytes."""
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise CheckpointImportError(f"{source}: archive entry {entry} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        # Uncompressed, the archive cannot hold more tensor bytes than the file has: no zip bomb.
        raise CheckpointImportError(
            f"{source}: storage {entry} is compressed, but torch.save stores tensor data uncompressed "
            "(re-save the checkpoint with torch.save)"
        )
    if info.file_size != expected:
        raise CheckpointImportError(
            f"{source}: storage {entry} holds {info.file_size} bytes, expected {expected}"
        )
    return read_entry(archive, entry, expected, source)


def archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CheckpointImportError(f"{source}: not a torch.save archive (expected one <stem>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and read_entry(archive, byteorder, 64, source).strip() != b"little":
        raise CheckpointImportError(f"{source}: big-endian torch archives are not supported")
    return prefix


def check_view(
    size: tuple[int, ...], stride: tuple[int, ...], offset: int, storage_numel: int, what: str
) -> int:
    """The view's element count, after checking it stays inside its storage and never aliases an element.

    Overlapping views (stride 0, or strides that revisit elements) are refused: they let a few bytes of storage
    stand for a tensor of any size, which a checkpoint writer then materialises.
    """
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        raise UnsafePickleError(f"{what}: malformed tensor view, size {list(size)} stride {list(stride)}")
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        return 0
    # Sorted by stride, each dimension must step past everything the smaller ones reach: no element twice.
    reach = 0
    for n, s in sorted(((n, s) for n, s in zip(size, stride, strict=True) if n > 1), key=lambda d: d[1]):
        if s <= reach:
            raise UnsafePickleError(
                f"{what}: tensor view size {list(size)} stride {list(stride)} overlaps itself (a stride-0 or "
                "overlapping view); a checkpoint stores each element once"
            )
        reach += (n - 1) * s
    if offset + reach >= storage_numel:
        raise UnsafePickleError(
            f"{what}: tensor view size {list(size)} stride {list(stride)} offset {offset} reads past the end "
            f"of its storage ({storage_numel} elements)"
        )
    return numel


class ViewBudget:
    """Elements viewed per storage: all views of one storage together may not expand it more than 4x."""

    def __init__(self) -> None:
        self.viewed: dict[Any, int] = {}

    def add(self, key: Any, numel: int, storage_numel: int, what: str) -> None:
        total = self.viewed.get(key, 0) + numel
        if total > MAX_VIEW_EXPANSION * storage_numel:
            raise UnsafePickleError(
                f"{what}: the tensors viewing one storage of {storage_numel:,} elements add up to {total:,} "
                f"elements, more than {MAX_VIEW_EXPANSION}x the storage"
            )
        self.viewed[key] = total


def check_views(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Apply :func:`check_view` and the per-storage expansion bound to tensors loaded by ``torch.load``."""
    budget = ViewBudget()
    for name, t in tensors.items():
        storage = t.untyped_storage()
        storage_numel = storage.nbytes() // t.element_size()
        numel = check_view(tuple(t.shape), t.stride(), t.storage_offset(), storage_numel, f"{source}: {name}")
        if numel:
            budget.add(storage.data_ptr(), numel, storage_numel, f"{source}: {name}")


def open_zip(source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointImportError(f"{source}: damaged zip archive: {e}") from None
