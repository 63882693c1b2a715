"""Read a ``torch.save`` zip archive without running any code from it.

SVD-LLM publishes whole pickled models (``torch.save({'model': model, 'tokenizer': tok})``). Loading those with
``torch.load(weights_only=False)`` needs the authors' source tree and runs whatever the pickle asks for. This
module reads the same archive with a restricted unpickler:

- tensors are rebuilt by our own code from the archive's ``<stem>/data/N`` storages, with bounds checks;
- plain containers (dict, list, tuple, set, OrderedDict, bytes) load as themselves;
- every other class becomes an inert :class:`Record` holding its module, name, constructor args and state;
- calling anything that is not on the allowlist (``REDUCE`` of ``os.system``, ``builtins.exec``, a model class,
  ...) raises :class:`UnsafePickleError` before anything runs, and allowed calls are charged for the elements
  they create;
- the stream is scanned and bounded first (:mod:`rankserve.importers.pickle_scan`).

:func:`module_tensors` then walks a tree of ``nn.Module`` records and returns their parameters and buffers by
dotted name, the same names ``state_dict()`` would give.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rankserve.importers.errors import CheckpointImportError, UnsafePickleError
from rankserve.importers.pickle_scan import (
    DTYPE_NAMES,
    MAX_NDIM,
    MAX_PICKLE_BYTES,
    MAX_WORK,
    STORAGE_DTYPES,
    ViewBudget,
    archive_prefix,
    check_view,
    hostile,
    itemsize,
    open_zip,
    py3_name,
    read_entry,
    scan_pickle,
    storage_bytes,
)


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
        return self.untyped.nbytes() // itemsize(self.dtype)


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
    # no "tuple": pickles build tuples with opcodes, and scan_pickle's depth bound relies on that
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
}


# Types that NEWOBJ may instantiate (``cls.__new__(cls)``): plain containers only.
_NEWOBJ_TYPES = (set, frozenset, list, dict, collections.OrderedDict, bytearray)


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # Protocol 2 pickles ``bytes`` as ``_codecs.encode(str, "latin1")``; nothing else is accepted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > MAX_NDIM
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in value)
    ):
        raise UnsafePickleError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> torch.Tensor:
    """Our own ``torch._utils._rebuild_tensor_v2``: a view of an archive storage, bounds- and overlap-checked.

    ``requires_grad``, hooks and metadata are dropped: an imported tensor is plain data.
    """
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not an archive storage")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise UnsafePickleError(f"malformed tensor view: offset {storage_offset!r}")
    # ``Tensor.set_`` does not check overlap, so a stride-0 view could stand for a tensor of any size.
    check_view(size, stride, storage_offset, storage.numel(), f"storage data/{storage.key}")
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _plain_state(state: Any, what: str) -> None:
    """A tensor's pickled Python attributes (e.g. transformers' ``_is_hf_initialized``) must be plain scalars."""
    if state is None:
        return
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in state.items()
    ):
        raise UnsafePickleError(
            f"refusing {what}: the tensor's pickled attributes must be a dict of names to plain scalars, "
            f"found {type(state).__name__}"
        )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    _plain_state(state, "torch._utils._rebuild_parameter_with_state")
    return data


# ``torch._tensor._rebuild_from_type_v2(func, new_type, args, state)`` rebuilds a tensor that carries Python
# attributes: ``func(*args)``, cast to ``new_type``, then ``state`` set as attributes. Accepted only for these.
_INNER_REBUILDS = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)


_PLAIN_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


def _rebuild_from_type_v2(func, new_type, args, state) -> torch.Tensor:
    """The tensor ``func(*args)``; its attributes are dropped (they are flags, never weights)."""
    what = "torch._tensor._rebuild_from_type_v2"
    if not any(func is f for f in _INNER_REBUILDS):
        raise UnsafePickleError(f"refusing {what} around {func!r}: only tensor-rebuild functions are allowed")
    if not isinstance(new_type, _Global) or (new_type.module, new_type.name) not in _PLAIN_TENSOR_TYPES:
        raise UnsafePickleError(f"refusing {what} to type {new_type!r}: only torch.Tensor and Parameter")
    if not isinstance(args, tuple):
        raise UnsafePickleError(f"refusing {what}: malformed arguments")
    _plain_state(state, what)
    return func(*args)


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
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode_latin1,
    **{("builtins", name): obj for name, obj in _SAFE_BUILTINS.items()},
}


_CALLABLE_IDS = {id(fn) for fn in _ALLOWED_CALLABLES.values()}


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)


def _views_storage(func: Any, args: tuple) -> bool:
    """Whether this allowed call makes a new view of an archive storage (counted against the view budget)."""
    if func is _rebuild_from_type_v2 and args:
        func = args[0]
    return func is _rebuild_tensor_v2 or func is _rebuild_tensor


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
        self._work = 0  # elements created or consumed by allowed calls
        self._views = ViewBudget()

    def _refuse(self, what: str, why: str) -> UnsafePickleError:
        return UnsafePickleError(f"refusing to call {what} from {self._source}: {why}")

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:
            module, name = py3_name(module, name)
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPE_NAMES:
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
            or numel < 0
        ):
            raise UnsafePickleError(f"malformed storage id {pid!r} in {self._source}")
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            raw = storage_bytes(self._archive, entry, numel * itemsize(storage_type.dtype), self._source)
            untyped = (
                torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            )
            self._storages[key] = _Storage(untyped, storage_type.dtype, key)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointImportError(f"{self._source}: storage data/{key} is read as two different dtypes")
        return storage

    # ---- opcodes that call something ----

    def _charge(self, n: int) -> None:
        self._work += n
        if self._work > MAX_WORK:
            raise hostile(self._source, f"allowed calls create more than {MAX_WORK:,} elements")

    def _call(self, func: Any, args: tuple) -> Any:
        if id(func) not in _CALLABLE_IDS:
            what = f"{func.module}.{func.name}" if isinstance(func, _Global) else repr(func)
            raise self._refuse(what, "only tensor-rebuild functions and plain containers may be called")
        # Charged before the call, so ``bytes(10**12)`` or ``frozenset(bytes(3 * 10**8))`` never starts.
        cost = 1
        for arg in args:
            if isinstance(arg, int) and func in (bytes, bytearray):
                cost += max(arg, 0)
            elif isinstance(arg, _SIZED):
                cost += len(arg)
            elif func is str and not isinstance(arg, (int, float)):  # str(x) of a container is its repr
                raise self._refuse(f"builtins.str on {type(arg).__name__}", "only text and numbers")
        self._charge(cost)
        result = func(*args)
        if isinstance(result, _SIZED):
            self._charge(len(result))
        if _views_storage(func, args):
            storage = result.untyped_storage()
            n = storage.nbytes() // result.element_size()
            self._views.add(storage.data_ptr(), result.numel(), n, f"{self._source}: a tensor view")
        return result

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


def load_restricted(path: str | Path) -> Any:
    """Unpickle a ``torch.save`` zip archive without importing or calling anything outside the allowlist.

    Returns the pickled object with tensors rebuilt on the CPU, containers as themselves and every other object
    as a :class:`Record`. Raises :class:`UnsafePickleError` if the pickle tries to call anything else or exceeds
    the bounds (depth, work, sizes, overlapping views), and :class:`CheckpointImportError` if the file is not a
    torch zip archive (legacy or raw pickles are not read at all) or is damaged.
    """
    source = str(path)
    if not zipfile.is_zipfile(source):
        raise CheckpointImportError(
            f"{source}: not a torch zip archive (legacy torch.save or raw pickle files are not read); "
            "re-save it with a current torch from a trusted environment"
        )
    with open_zip(source) as archive:
        prefix = archive_prefix(archive, source)
        data = read_entry(archive, f"{prefix}data.pkl", MAX_PICKLE_BYTES, source)
        scan_pickle(data, source)
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
            MemoryError,
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
