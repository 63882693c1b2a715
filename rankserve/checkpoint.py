"""The rankserve checkpoint: a self-describing, versioned HF-style directory for compressed models.

Layout of a checkpoint directory::

    config.json         the base model's HF config (``ModelConfig.to_hf()``)
    rankserve.json      the manifest: format version, family, ratio, every projection's kind/shape/rank, ...
    model.safetensors   dense tensors by HF name; ``<m>.U``/``<m>.V`` (low-rank), ``<m>.coeff`` (shared basis),
                        each shared basis once as ``shared_bases.<group>``; ``<m>.bias``; a tied LM head omitted
    tokenizer files     whatever ``tokenizer.save(dir)`` writes

Nothing is inferred from file or tensor names: the loader builds the model from ``config.json`` and the manifest,
then checks every tensor against it. Golden checkpoints under ``tests/golden/`` keep old versions loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Mapping

import torch
from torch import nn

from rankserve import __version__, fsutil
from rankserve.config import ConfigError, ModelConfig
from rankserve.hashing import update_from_file
from rankserve.layers import (
    DenseLinear,
    LowRankLinear,
    Projection,
    SharedBasisLinear,
    projections,
    replace_module,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST_NAME = "rankserve.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BASIS_PREFIX = "shared_bases."
RATIO_CONVENTION = (
    "fraction of decoder linear-layer parameters removed (SVD-LLM convention); "
    "embeddings and LM head not counted"
)
KINDS = ("dense", "lowrank", "shared")
REQUIRED_KEYS = (
    "format_version",
    "family",
    "family_config",
    "ratio",
    "ratio_convention",
    "dtype",
    "source",
    "calibration",
    "projections",
    "shared_bases",
    "params_linear_dense",
    "params_linear",
    "created_by",
)
# Files hashed when the source is a directory: the config and the weights, never tokenizers or READMEs.
_SOURCE_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with what is wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def _is_lm_head(name: str) -> bool:
    return name == "lm_head"


def _describe_projections(model: nn.Module) -> tuple[dict, dict]:
    """(projections, shared_bases) manifest entries, computed from the model's modules."""
    projs, bases = {}, {}
    basis_group: dict[int, str] = {}  # id(basis Parameter) -> group name, to catch two bases under one name
    for name, p in projections(model).items():
        entry = {
            "kind": p.kind,
            "shape": [p.out_features, p.in_features],
            "rank": p.rank(),
            "bias": p.bias is not None,
        }
        if p.kind not in KINDS:
            raise CheckpointError(f"{name}: projection kind {p.kind!r} has no checkpoint form")
        if isinstance(p, SharedBasisLinear):
            group = p.group
            if not group:
                raise CheckpointError(f"{name}: SharedBasisLinear has no group name; set .group")
            seen = basis_group.setdefault(id(p.basis), group)
            if seen != group:
                raise CheckpointError(
                    f"{name}: its basis is shared with group {seen!r} but it says {group!r}"
                )
            if group in bases:
                if bases[group]["_id"] != id(p.basis):
                    raise CheckpointError(f"group {group!r} names two different basis tensors (at {name})")
                bases[group]["members"].append(name)
            else:
                bases[group] = {"shape": list(p.basis.shape), "members": [name], "_id": id(p.basis)}
            entry["group"] = group
        projs[name] = entry
    for b in bases.values():
        del b["_id"]
    return projs, bases


def _param_counts(projs: Mapping, bases: Mapping) -> tuple[int, int]:
    """(dense, actual) weight parameters of the decoder projections; the LM head is not counted."""
    dense = actual = 0
    for name, e in projs.items():
        if _is_lm_head(name):
            continue
        out, inp = e["shape"]
        dense += out * inp
        if e["kind"] == "dense":
            actual += out * inp
        elif e["kind"] == "lowrank":
            actual += e["rank"] * (out + inp)
        else:
            actual += out * e["rank"]  # the coefficients; the basis is counted once below
    for b in bases.values():
        if not all(_is_lm_head(m) for m in b["members"]):
            actual += b["shape"][0] * b["shape"][1]
    return dense, actual


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_fingerprint(path: str) -> dict:
    """``{"path", "sha256", "hashed"}`` of a source model: a file's bytes, or for a directory its config and
    weight files streamed in name order (each preceded by its name and size)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    if os.path.isfile(path):
        update_from_file(h, path)
        return {"path": os.path.abspath(path), "sha256": h.hexdigest(), "hashed": "file"}
    if os.path.isdir(path):
        names = sorted(
            f
            for f in os.listdir(path)
            if os.path.isfile(os.path.join(path, f))
            and (f == CONFIG_NAME or f.endswith(_SOURCE_FILE_SUFFIXES))
        )
        if not names:
            raise CheckpointError(f"source {path}: no config.json or weight files to hash")
        for f in names:
            full = os.path.join(path, f)
            h.update(f"{f}\0{os.path.getsize(full)}\0".encode())
            update_from_file(h, full)
        return {
            "path": os.path.abspath(path),
            "sha256": h.hexdigest(),
            "hashed": "directory: sha256 over (name, size, bytes) of " + ", ".join(names),
        }
    raise CheckpointError(f"source {path}: no such file or directory")


def build_manifest(
    model: nn.Module,
    *,
    family: str = "dense",
    family_config: dict | None = None,
    ratio: float | None = None,
    source_path: str | None = None,
    calibration: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The manifest of ``model``: projections, shared bases and parameter counts are read from the model.

    ``ratio`` is the target fraction of decoder linear-layer parameters *removed*; ``ratio_measured`` is what
    the model actually achieves. ``extra`` keys (notes, wall time, ...) are added as they are, but may not
    replace a standard key.
    """
    projs, bases = _describe_projections(model)
    dense, actual = _param_counts(projs, bases)
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "family_config": dict(family_config or {}),
        "ratio": None if ratio is None else float(ratio),
        "ratio_convention": RATIO_CONVENTION,
        "ratio_measured": round(1.0 - actual / dense, 6) if dense else None,
        "dtype": _dtype_name(_model_dtype(model)),
        "source": source_fingerprint(source_path)
        if source_path is not None
        else {"path": None, "sha256": None},
        "calibration": calibration,
        "projections": projs,
        "shared_bases": bases,
        "params_linear_dense": dense,
        "params_linear": actual,
        "created_by": f"rankserve {__version__}",
    }
    for k, v in (extra or {}).items():
        if k in manifest:
            raise CheckpointError(f"extra manifest key {k!r} would replace a standard key")
        manifest[k] = v
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"manifest is not JSON-serialisable: {e}") from None
    validate_manifest(manifest)
    return manifest


def validate_manifest(m: object, where: str = "manifest") -> dict:
    """Check a manifest's version, keys, types and internal consistency; return it or raise CheckpointError."""
    if not isinstance(m, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(m).__name__}")
    if "format_version" not in m:
        raise CheckpointError(f"{where}: missing key format_version: not a rankserve manifest")
    v = m["format_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise CheckpointError(
            f"{where}: format_version {v!r} is not supported (this rankserve {__version__} reads version "
            f"{supported}); a newer version needs a newer rankserve"
        )
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")

    def fail(msg: str):
        raise CheckpointError(f"{where}: {msg}")

    if not isinstance(m["family"], str):
        fail(f"family must be a string, found {m['family']!r}")
    if not isinstance(m["family_config"], dict):
        fail("family_config must be an object")
    r = m["ratio"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r)):
        fail(f"ratio must be a number or null, found {r!r}")
    if m["ratio_convention"] != RATIO_CONVENTION:
        fail(f"ratio_convention {m['ratio_convention']!r} is not rankserve's ({RATIO_CONVENTION!r})")
    if not isinstance(m["source"], dict) or not {"path", "sha256"} <= m["source"].keys():
        fail("source must be an object with path and sha256")
    if m["calibration"] is not None and not isinstance(m["calibration"], dict):
        fail("calibration must be an object or null")
    if not isinstance(m["dtype"], str) or not isinstance(getattr(torch, m["dtype"], None), torch.dtype):
        fail(f"dtype {m['dtype']!r} is not a torch dtype name")
    for k in ("params_linear_dense", "params_linear"):
        if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 0:
            fail(f"{k} must be a non-negative integer, found {m[k]!r}")

    def pos_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    projs, bases = m["projections"], m["shared_bases"]
    if not isinstance(projs, dict) or not isinstance(bases, dict):
        fail("projections and shared_bases must be objects")
    for g, b in bases.items():
        if not isinstance(b, dict) or not isinstance(b.get("members"), list) or not b["members"]:
            fail(f"shared basis {g}: members must be a non-empty list")
        shape = b.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(pos_int(s) for s in shape)):
            fail(f"shared basis {g}: shape must be [rank, in] positive integers, found {shape!r}")
    for name, e in projs.items():
        if not isinstance(e, dict):
            fail(f"projection {name}: expected an object")
        kind, shape, rank = e.get("kind"), e.get("shape"), e.get("rank")
        if kind not in KINDS:
            fail(f"projection {name}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(pos_int(s) for s in shape)):
            fail(f"projection {name}: shape must be [out, in] positive integers, found {shape!r}")
        if kind == "dense" and rank is not None:
            fail(f"projection {name}: a dense projection has rank null, found {rank!r}")
        if kind != "dense" and not pos_int(rank):
            fail(f"projection {name}: rank must be a positive integer, found {rank!r}")
        if not isinstance(e.get("bias"), bool):
            fail(f"projection {name}: bias must be true or false")
        if kind == "shared":
            g = e.get("group")
            if not isinstance(g, str) or g not in bases:
                fail(f"projection {name}: group {g!r} is not in shared_bases")
            if name not in bases[g].get("members", []):
                fail(f"projection {name}: not listed as a member of group {g!r}")
            if [rank, shape[1]] != bases[g].get("shape"):
                fail(
                    f"projection {name}: rank {rank} and in {shape[1]} disagree with its group {g!r} basis "
                    f"shape {bases[g].get('shape')}"
                )
    for g, b in bases.items():
        for member in b["members"]:
            e = projs.get(member)
            if not e or e.get("kind") != "shared" or e.get("group") != g:
                fail(f"shared basis {g}: member {member} is not a shared projection of this group")
    if "healing" in m:
        _validate_healing(m["healing"], fail)
    return m


def _validate_healing(h: object, fail) -> None:
    """The optional ``healing`` record written by ``rankserve heal`` (rankserve.heal.healed_manifest)."""
    if not isinstance(h, dict):
        fail("healing must be an object")
    t = h.get("teacher")
    if not isinstance(t, dict) or not isinstance(t.get("sha256"), str) or "path" not in t:
        fail("healing.teacher must be an object with path and sha256")
    data = h.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "source" in d for d in data):
        fail("healing.data must be a non-empty list of objects with a source")
    for k in ("tokens", "steps", "trained_params"):
        v = h.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            fail(f"healing.{k} must be a positive integer, found {v!r}")
    for k in ("lr", "final_kl", "wall_time_s"):
        v = h.get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            fail(f"healing.{k} must be a finite non-negative number, found {v!r}")
    if not isinstance(h.get("schedule"), str):
        fail("healing.schedule must be a string")
    trained = h.get("trained")
    if not isinstance(trained, list) or not trained or not all(isinstance(g, str) for g in trained):
        fail("healing.trained must be a non-empty list of parameter group names")


def read_manifest(path: str) -> dict:
    """The validated manifest of a checkpoint directory (or of a ``rankserve.json`` path)."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}: not a rankserve checkpoint") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    return validate_manifest(m, where=file)


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to write, by checkpoint name: shared bases once, a tied LM head omitted."""
    tied = model.config.tie_word_embeddings
    projs = projections(model)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if tied and key == "lm_head.weight":
            head, emb = model.lm_head, model.model.embed_tokens.weight
            if not isinstance(head, DenseLinear) or (
                head.weight is not emb and not torch.equal(head.weight, emb)
            ):
                raise CheckpointError("the config ties embeddings but lm_head is not the embedding matrix")
            continue
        p = projs.get(module)
        if isinstance(p, SharedBasisLinear) and leaf == "basis":
            out.setdefault(BASIS_PREFIX + p.group, t)  # every member holds the same Parameter
            continue
        out[key] = t
    return out


def _check_manifest_matches(model: nn.Module, manifest: dict) -> None:
    projs, bases = _describe_projections(model)
    if projs != manifest["projections"] or bases != manifest["shared_bases"]:
        diff = sorted(
            k
            for k in projs.keys() | manifest["projections"].keys()
            if projs.get(k) != manifest["projections"].get(k)
        )
        raise CheckpointError(
            "the manifest does not describe this model (differs at "
            f"{', '.join(diff[:3]) or 'shared_bases'}); build it with build_manifest(model)"
        )


def _write_tensor(f, t: torch.Tensor) -> None:
    """Append one tensor's raw little-endian bytes (one tensor in memory at a time, never the whole model)."""
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file, streaming tensor by tensor (the format: u64 header length, JSON header padded
    to 8 bytes, then the tensors' bytes in header order)."""
    # Not safetensors.torch.save_file: the versions pyproject allows (>= 0.4) serialise every tensor to bytes
    # before writing, a second copy of the model in RAM. 0.8 writes from pointers (measured: +1 MiB peak RSS
    # for 384 MiB of tensors, +4 MiB here), but it still refuses tensors that share storage (imported views of
    # one pickled storage) and does not fsync, which the rename into place relies on.
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            _write_tensor(f, t.detach().to("cpu").contiguous())  # one tensor on the host at a time
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)
    # Keep lists of numbers such as shapes on one line. Only pretty-printed lists span lines (a JSON string
    # never holds a raw newline), so string contents are never touched.
    num = r"-?[\d.eE+-]+"
    text = re.sub(
        rf"\[\n\s*({num}(?:,\n\s*{num})*)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m[1]) + "]", text
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _dir_mode() -> int:
    """0o777 minus the process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o755


# A save writes into ``.NAME.tmp-<pid>-<random>`` beside NAME; the fallback swap sets the old checkpoint aside
# as ``.NAME.old-<pid>-<random>``. The pid tells a killed save's leftovers from another process's live save.
_TMP_PREFIX = r"\..+\.tmp-"
_OLD_PREFIX = r"\.(?P<name>.+)\.old-"


def recover_leftovers(parent: str) -> None:
    """Clean up after saves into ``parent`` that were killed: their temporary directories are removed, and an
    old checkpoint that the fallback swap had set aside is put back under its name if that name is empty
    (removed otherwise). Only leftovers of dead processes are touched."""
    fsutil.sweep(parent, _TMP_PREFIX)
    for m in fsutil.dead_leftovers(parent, _OLD_PREFIX):
        aside, target = os.path.join(parent, m[0]), os.path.join(parent, m["name"])
        try:
            if os.path.lexists(target):
                shutil.rmtree(aside)
            else:
                os.rename(aside, target)
                log.warning("restored %s, set aside by an overwrite that was interrupted", target)
        except OSError:
            pass  # a read-only parent or a race with another run: the next run tries again


def check_out_dir(path: str, overwrite: bool = False) -> str:
    """Check that a checkpoint can be written at ``path`` and return its absolute path; every writer calls this
    before any work, so bad output paths cost nothing.

    Refused, with a CheckpointError that says what to do: an existing ``path`` unless ``overwrite`` (and even
    then anything but a real directory), a parent directory that is missing or not writable. Leftovers of
    killed saves in the parent are cleaned first (:func:`recover_leftovers`).
    """
    out = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise CheckpointError(
            f"{path}: the parent directory {parent} {what}; create it or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{path}: the directory {parent} is not writable; choose another path")
    recover_leftovers(parent)
    if os.path.lexists(out):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; choose another path or pass --overwrite")
        if os.path.islink(out) or not os.path.isdir(out):
            raise CheckpointError(f"{path} exists and is not a directory; refusing to replace it")
    return out


def save_checkpoint(
    model: nn.Module, out_dir: str, *, tokenizer, manifest: dict, overwrite: bool = False
) -> str:
    """Write ``model`` as a checkpoint directory at ``out_dir`` atomically; return its path.

    Everything is written to a temporary sibling directory, then renamed into place, so a crash, a kill or an
    exception leaves either no checkpoint or the complete one. An existing ``out_dir`` is refused unless
    ``overwrite``; then the new directory and the old one are exchanged atomically, so the name holds a whole
    checkpoint, old or new, at every instant (:func:`_swap_into_place`).
    ``tokenizer`` is a :class:`~rankserve.tokenizer.Tokenizer` (``None`` writes no tokenizer files).
    """
    out_dir = check_out_dir(out_dir, overwrite)
    parent, name = os.path.split(out_dir)
    validate_manifest(manifest)
    _check_manifest_matches(model, manifest)
    if manifest["dtype"] != _dtype_name(_model_dtype(model)):
        raise CheckpointError(f"manifest dtype {manifest['dtype']} but the model is {_model_dtype(model)}")
    tensors = _checkpoint_tensors(model)
    tmp = fsutil.owned_tempdir(f".{name}.tmp-", parent)
    try:
        os.chmod(tmp, _dir_mode())  # mkdtemp makes it private (0700); a checkpoint is an ordinary directory
        if tokenizer is not None:
            tokenizer.save(tmp)  # first, so that nothing it writes can shadow our own files
        else:
            log.warning("saving %s without a tokenizer", out_dir)
        _write_json(os.path.join(tmp, CONFIG_NAME), model.config.to_hf())
        _write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
        meta = {"format": "pt", "rankserve_format_version": str(FORMAT_VERSION)}
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, meta)
        _swap_into_place(tmp, out_dir, overwrite)
    finally:
        _remove_tree(tmp)  # after a swap it holds the old checkpoint; after a failure, the partial new one
    log.info("saved checkpoint %s (%d tensors)", out_dir, len(tensors))
    return out_dir


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Move the finished checkpoint ``tmp`` to ``out_dir``; an existing ``out_dir`` ends up at ``tmp``."""
    parent, name = os.path.split(out_dir)
    if not os.path.exists(out_dir):
        try:
            os.rename(tmp, out_dir)  # fails if out_dir appeared meanwhile and is non-empty
            return
        except OSError:
            if not os.path.exists(out_dir):
                raise
    if not overwrite:
        raise CheckpointError(f"{out_dir} already exists; choose another path or pass --overwrite")
    if fsutil.exchange(tmp, out_dir):
        return
    # No atomic exchange on this OS or filesystem (NFS, Windows, some FUSE): two renames, with a moment in
    # between when the name is empty. The old checkpoint is set aside under a pid-tagged name, so if this
    # process dies there, the next save into this directory, or the next load of the name, puts it back
    # (recover_leftovers). We do not make the name a symlink to versioned directories instead: that changes
    # what a checkpoint is on disk for every user (copy and upload tools see a link), and an existing real
    # directory still could not be turned into such a link atomically.
    aside = fsutil.owned_tempdir(f".{name}.old-", parent)
    os.rmdir(aside)  # only the unique name is wanted; rename needs the target free
    os.replace(out_dir, aside)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(aside, out_dir)  # put the old checkpoint back
        raise
    _remove_tree(aside)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _skeleton(cfg: ModelConfig, manifest: dict, where: str) -> nn.Module:
    """The model on the meta device with every projection replaced as the manifest says."""
    from rankserve.loaders.weights import new_model

    model = new_model(cfg)
    have = projections(model)
    specs = manifest["projections"]
    missing = [n for n in have if n not in specs]
    if missing:
        raise CheckpointError(f"{where}: manifest lacks projection(s) {', '.join(missing[:3])} of this model")
    bases = {
        g: nn.Parameter(torch.empty(b["shape"], device="meta"), requires_grad=False)
        for g, b in manifest["shared_bases"].items()
    }
    for name, e in specs.items():
        cur = have.get(name)
        if cur is None:
            raise CheckpointError(f"{where}: manifest names projection {name}, which the model does not have")
        out, inp = e["shape"]
        if (out, inp) != (cur.out_features, cur.in_features):
            raise CheckpointError(
                f"{where}: projection {name} has shape [{out}, {inp}] in the manifest, "
                f"[{cur.out_features}, {cur.in_features}] in config.json"
            )
        if e["kind"] == "lowrank":
            new: Projection = LowRankLinear(inp, out, e["rank"], e["bias"], device="meta")
        elif e["kind"] == "shared":
            coeff = nn.Parameter(torch.empty(out, e["rank"], device="meta"), requires_grad=False)
            bias = torch.empty(out, device="meta") if e["bias"] else None
            new = SharedBasisLinear(bases[e["group"]], coeff, bias, group=e["group"])
        else:
            new = DenseLinear(inp, out, e["bias"], device="meta")
        replace_module(model, name, new)
    return model


def _expected_tensors(model: nn.Module, manifest: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for the skeleton."""
    tied = model.config.tie_word_embeddings
    expected = {}
    projs = projections(model)
    for key, p in model.state_dict(keep_vars=True).items():
        module, _, leaf = key.rpartition(".")
        if tied and key == "lm_head.weight":
            continue
        if isinstance(projs.get(module), SharedBasisLinear) and leaf == "basis":
            continue
        expected[key] = tuple(p.shape)
    for g, b in manifest["shared_bases"].items():
        expected[BASIS_PREFIX + g] = tuple(b["shape"])
    return expected


def _check_tensors(tensors: Mapping, expected: Mapping, manifest: dict, where: str) -> None:
    def listed(names: list[str]) -> str:
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more

    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {listed(missing)}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {listed(unexpected)}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) == shape:
            if not t.is_floating_point():
                raise CheckpointError(f"{where}: tensor {name} has dtype {t.dtype}, expected floating point")
            continue
        module, _, leaf = name.rpartition(".")
        e = manifest["projections"].get(module)
        if name.startswith(BASIS_PREFIX):
            g = name[len(BASIS_PREFIX) :]
            raise CheckpointError(
                f"{where}: shared basis {g}: manifest shape {list(shape)} (rank {shape[0]}), "
                f"tensor {name} has shape {list(t.shape)}"
            )
        if e is not None and e["kind"] != "dense" and leaf in ("U", "V", "coeff"):
            raise CheckpointError(
                f"{where}: module {module}: manifest rank {e['rank']}, tensor {name} has shape "
                f"{list(t.shape)} (expected {list(shape)})"
            )
        raise CheckpointError(f"{where}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[nn.Module, dict]:
    """(model, manifest) from a checkpoint directory; every tensor is checked against the manifest.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, so the weights
    are materialised once (not at all on CPU when ``dtype`` is the stored dtype).
    """
    from rankserve.loaders.st_mmap import SafetensorsError, load_mmap

    path = os.fspath(path)
    manifest = read_manifest(path)
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_NAME}") from None
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: {e}") from None
    model = _skeleton(cfg, manifest, path)
    if cfg.tie_word_embeddings and manifest["projections"].get("lm_head", {}).get("kind", "dense") != "dense":
        raise CheckpointError(f"{path}: config ties embeddings but the manifest factorizes lm_head")

    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    try:
        tensors = load_mmap(weights)
    except SafetensorsError as e:
        raise CheckpointError(f"{e}") from None  # names the file and says truncated/corrupt
    _check_tensors(tensors, _expected_tensors(model, manifest), manifest, weights)

    # Assign by hand rather than load_state_dict(assign=True): that would wrap a shared basis in a new
    # Parameter per member, and model.parameters() would then count it once per member.
    bases = {
        g: nn.Parameter(tensors[BASIS_PREFIX + g].to(device=device, dtype=dtype), requires_grad=False)
        for g in manifest["shared_bases"]
    }
    for mod_name, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)):
            key = f"{mod_name}.{pname}" if mod_name else pname
            if cfg.tie_word_embeddings and key == "lm_head.weight":
                continue
            if isinstance(mod, SharedBasisLinear) and pname == "basis":
                param = bases[mod.group]
            else:
                param = nn.Parameter(tensors[key].to(device=device, dtype=dtype), requires_grad=False)
            setattr(mod, pname, param)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # a bug, not a bad file: every parameter was checked above
        raise CheckpointError(f"{path}: parameters left unassigned: {', '.join(still_meta[:3])}")
    model.init_buffers(device)
    log.info(
        "loaded checkpoint %s (family %s, format %d)", path, manifest["family"], manifest["format_version"]
    )
    return model.eval(), manifest
