"""Read a ``torch.save`` zip archive without running any code from it.

SVD-LLM publishes whole pickled models (``torch.save({'model': model, 'tokenizer': tok})``). Loading those with
``torch.load(weights_only=False)`` needs the authors' source tree and runs whatever the pickle asks for. This
module reads the same archive with a restricted unpickler:

- tensors are rebuilt by our own code from the archive's ``<stem>/data/N`` storages, with bounds checks;
- plain containers (dict, list, tuple, set, OrderedDict, bytes) load as themselves;
- every other class becomes an inert :class:`Record` holding its module, name, constructor args and state;
- calling anything that is not on the allowlist (``REDUCE`` of ``os.system``, ``builtins.exec``, a model class,
  ...) raises :class:`UnsafePickleError` before anything runs.

:func:`module_tensors` then walks a tree of ``nn.Module`` records and returns their parameters and buffers by
dotted name, the same names ``state_dict()`` would give.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointImportError",
    "Record",
    "UnsafePickleError",
    "load_restricted",
    "module_tensors",
]


class CheckpointImportError(ValueError):
    """A checkpoint cannot be imported: wrong layout, wrong shapes, missing tensors, unsupported model."""


class UnsafePickleError(CheckpointImportError):
    """The pickle asks to call something outside the allowlist; nothing was called."""


class Record:
    """Inert stand-in for an object of a class we refuse to import.

    ``module``/``name`` are the pickled class's location, ``args`` what ``cls.__new__`` would have received and
    ``state`` what ``__setstate__`` would have received (usually the instance ``__dict__``).
    """

    def __init__(self, module: str = "", name: str = "", args: tuple = ()):
        self.module = module
        self.name = name
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def get(self, key: str, default: Any = None) -> Any:
        """``state[key]`` when the state is a dict (the usual ``__dict__`` case), else ``default``."""
        if isinstance(self.state, Mapping):
            return self.state.get(key, default)
        return default

    def __repr__(self) -> str:
        return f"Record({self.qualname})"


class _Global:
    """What ``find_class`` returns for a class we do not import: it can only be turned into a Record."""

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    def __repr__(self) -> str:
        return f"<global {self.module}.{self.name}>"


class _StorageType:
    """A ``torch.<X>Storage`` reference: only meaningful inside a storage persistent id."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype


class _Storage:
    """One ``<stem>/data/<key>`` entry of the archive, read as raw bytes."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, key: str):
        self.untyped = untyped
        self.dtype = dtype
        self.key = key

    def numel(self) -> int:
        return self.untyped.nbytes() // _itemsize(self.dtype)


# Storage class names as torch pickles them (``torch.serialization`` writes ``getattr(torch, "<X>Storage")``).
_STORAGE_DTYPES = {
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

_DTYPE_NAMES = {
    name
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype) and not name.startswith("_")
}

# Globals an honest model file never references. They are refused as soon as they are named, even if never
# called, so a hostile file fails with a clear message before any further parsing.
_DANGEROUS_MODULES = {
    "__builtin__",
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "code",
    "codeop",
    "ctypes",
    "pty",
    "pickle",
    "_pickle",
    "marshal",
    "types",
    "functools",
    "operator",
    "io",
    "tempfile",
    "pathlib",
    "webbrowser",
    "signal",
    "threading",
    "multiprocessing",
    "asyncio",
    "platform",
    "pdb",
    "timeit",
    "inspect",
    "shelve",
    "zipimport",
}

_SAFE_BUILTINS = {
    "set": set,
    "frozenset": frozenset,
    "bytearray": bytearray,
    "bytes": bytes,
    "complex": complex,
    "slice": slice,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
}

# Types that NEWOBJ may instantiate (``cls.__new__(cls)``): plain containers only.
_NEWOBJ_TYPES = (set, frozenset, list, dict, collections.OrderedDict, bytearray)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # Protocol 2 pickles ``bytes`` as ``_codecs.encode(str, "latin1")``; nothing else is accepted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise UnsafePickleError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> torch.Tensor:
    """Our own ``torch._utils._rebuild_tensor_v2``: a view of an archive storage, bounds-checked.

    ``requires_grad``, hooks and metadata are dropped: an imported tensor is plain data.
    """
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not an archive storage")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0 or len(size) != len(stride):
        raise UnsafePickleError(
            f"malformed tensor view: offset {storage_offset!r}, size {size}, stride {stride}"
        )
    # ``Tensor.set_`` does not check bounds, so a hostile view could read past the buffer.
    if math.prod(size) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel():
            raise UnsafePickleError(
                f"tensor view size {list(size)} stride {list(stride)} offset {storage_offset} reads past the end "
                f"of storage data/{storage.key} ({storage.numel()} elements)"
            )
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _torch_size(dims) -> torch.Size:
    return torch.Size(_as_int_tuple(dims, "torch.Size"))


def _torch_device(spec) -> torch.device:
    # Devices are only recorded; everything loads on the CPU.
    if not isinstance(spec, (str, int)):
        raise UnsafePickleError(f"malformed torch.device argument {spec!r}")
    return torch.device("cpu")


_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode_latin1,
    **{("builtins", name): obj for name, obj in _SAFE_BUILTINS.items()},
}
_CALLABLE_IDS = {id(fn) for fn in _ALLOWED_CALLABLES.values()}


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with find_class, persistent_load and every calling opcode overridden.

    The C unpickler cannot intercept REDUCE/BUILD, so the Python one is used; ``data.pkl`` holds only
    metadata (the tensor bytes are separate archive entries), so speed does not matter.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, _Storage] = {}

    def _refuse(self, what: str, why: str) -> UnsafePickleError:
        return UnsafePickleError(f"refusing to call {what} from {self._source}: {why}")

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocol 2 writes Python 2 names (``__builtin__ set``)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module == "builtins" or module.split(".")[0] in _DANGEROUS_MODULES:
            raise self._refuse(
                f"{module}.{name}",
                "a model checkpoint never references this; the file is hostile or not a model",
            )
        return _Global(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        # torch's id: ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {pid!r} in {self._source}")
        _, storage_type, key, _location, numel = pid
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
        ):
            raise UnsafePickleError(f"malformed storage id {pid!r} in {self._source}")
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(entry)
            except KeyError:
                raise CheckpointImportError(f"{self._source}: archive entry {entry} is missing") from None
            expected = numel * _itemsize(storage_type.dtype)
            if len(raw) != expected:
                raise CheckpointImportError(
                    f"{self._source}: storage {entry} holds {len(raw)} bytes, expected {expected} "
                    f"({numel} x {storage_type.dtype})"
                )
            untyped = (
                torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            )
            self._storages[key] = _Storage(untyped, storage_type.dtype, key)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointImportError(f"{self._source}: storage data/{key} is read as two different dtypes")
        return storage

    # ---- opcodes that call something ----

    def _call(self, func: Any, args: tuple) -> Any:
        if id(func) in _CALLABLE_IDS:
            return func(*args)
        if isinstance(func, _Global):
            raise self._refuse(
                f"{func.module}.{func.name}",
                "only tensor-rebuild functions and plain containers may be called",
            )
        raise self._refuse(repr(func), "only tensor-rebuild functions and plain containers may be called")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise UnsafePickleError(f"malformed REDUCE arguments in {self._source}")
        self.stack[-1] = self._call(func, args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass: Any, args: tuple) -> None:  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    def _new(self, cls: Any, args: tuple) -> Any:
        if isinstance(cls, _Global):
            return Record(cls.module, cls.name, tuple(args))
        if cls in _NEWOBJ_TYPES:
            return cls.__new__(cls)
        raise self._refuse(f"{cls!r}.__new__", "only records and plain containers may be created")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        self.stack.pop()  # kwargs: a Record keeps only positional args
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Record):
            # BUILD on anything else would set attributes on a live object (say, an allowlisted function).
            raise self._refuse(f"__setstate__ of {type(inst).__name__}", "only records take pickled state")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def _archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CheckpointImportError(f"{source}: not a torch.save archive (expected one <stem>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointImportError(f"{source}: big-endian torch archives are not supported")
    return prefix


def load_restricted(path: str | Path) -> Any:
    """Unpickle a ``torch.save`` zip archive without importing or calling anything outside the allowlist.

    Returns the pickled object with tensors rebuilt on the CPU, containers as themselves and every other object
    as a :class:`Record`. Raises :class:`UnsafePickleError` if the pickle tries to call anything else, and
    :class:`CheckpointImportError` if the file is not a torch zip archive (legacy or raw pickles are not read
    at all).
    """
    source = str(path)
    if not zipfile.is_zipfile(source):
        raise CheckpointImportError(
            f"{source}: not a torch zip archive (legacy torch.save or raw pickle files are not read); "
            "re-save it with a current torch from a trusted environment"
        )
    with zipfile.ZipFile(source) as archive:
        prefix = _archive_prefix(archive, source)
        data = archive.read(f"{prefix}data.pkl")
        unpickler = _RestrictedUnpickler(data, archive, prefix, source)
        try:
            return unpickler.load()
        except CheckpointImportError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            TypeError,
            ValueError,
            IndexError,
            KeyError,
            AttributeError,
            RuntimeError,
            OverflowError,
            RecursionError,
        ) as e:
            raise CheckpointImportError(f"{source}: malformed pickle: {type(e).__name__}: {e}") from None


def _iter_module(record: Record, prefix: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    if id(record) in seen:  # a module reachable twice (tied submodules) is reported under its first name
        return
    seen.add(id(record))
    for slot in ("_parameters", "_buffers"):
        tensors = record.get(slot) or {}
        if not isinstance(tensors, Mapping):
            raise CheckpointImportError(f"{record.qualname} at {prefix or '<root>'}: {slot} is not a mapping")
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointImportError(
                    f"{prefix}{name}: expected a tensor, found {type(tensor).__name__}"
                )
            yield f"{prefix}{name}", tensor
    children = record.get("_modules") or {}
    if not isinstance(children, Mapping):
        raise CheckpointImportError(f"{record.qualname} at {prefix or '<root>'}: _modules is not a mapping")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise CheckpointImportError(
                f"{prefix}{name}: expected a module record, found {type(child).__name__}"
            )
        yield from _iter_module(child, f"{prefix}{name}.", seen)


def module_tensors(record: Record) -> dict[str, torch.Tensor]:
    """Parameters and buffers of an ``nn.Module`` record tree, keyed like ``state_dict()``.

    Walks ``_parameters``, ``_buffers`` and ``_modules`` in each record's state. Buffers listed as
    non-persistent are included too (the caller decides what to drop).
    """
    if (
        not isinstance(record, Record)
        or not isinstance(record.state, Mapping)
        or "_modules" not in record.state
    ):
        raise CheckpointImportError(f"{record!r} is not a pickled torch module")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in _iter_module(record, "", set()):
        out.setdefault(name, tensor)
    return out
