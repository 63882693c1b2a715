"""Writing and reading a rankserve checkpoint directory, atomically.

Layout of a checkpoint directory::

    config.json         the base model's HF config (``ModelConfig.to_hf()``)
    rankserve.json      the manifest (:mod:`rankserve.checkpoint.manifest`)
    model.safetensors   dense tensors by HF name; ``<m>.U``/``<m>.V`` (low-rank), ``<m>.coeff`` (shared basis),
                        each shared basis once as ``shared_bases.<group>``; ``<m>.bias``; a tied LM head omitted;
                        int8 matrices (format 2) as int8 with fp32 ``<name>_scale`` (rankserve.checkpoint.int8)
    tokenizer files     whatever ``tokenizer.save(dir)`` writes

The loader builds the model from ``config.json`` and the manifest, then checks every tensor against it. Golden
checkpoints under ``tests/golden/`` keep old versions loading.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping

import torch
from torch import nn

from rankserve import fsutil
from rankserve.checkpoint import int8
from rankserve.checkpoint.manifest import (
    CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    check_manifest_matches,
    read_manifest,
    validate_manifest,
)
from rankserve.checkpoint.names import BASIS_PREFIX, CheckpointError, dtype_name, model_dtype
from rankserve.config import ConfigError, ModelConfig
from rankserve.io.assign import assign, check_names, meta_parameters, new_model
from rankserve.io.safetensors import SafetensorsError, load_mmap, write_safetensors
from rankserve.layers import (
    SCALE_SUFFIX,
    DenseLinear,
    LowRankLinear,
    Projection,
    SharedBasisLinear,
    projections,
    replace_module,
)

log = logging.getLogger(__name__)

# A save writes into ``.NAME.tmp-<pid>-<random>`` beside NAME (fsutil.owned_tempdir); the pid tells a killed
# save's leftovers from another process's live save.
_TMP_PREFIX = r"\..+\.tmp-"


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to write, by checkpoint name: shared bases once, a tied LM head omitted unless it is int8
    (then it is its own matrix; the embedding stays float)."""
    tied = model.config.tie_word_embeddings and not model.lm_head.is_int8()
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
        if isinstance(p, SharedBasisLinear) and leaf in ("basis", "basis" + SCALE_SUFFIX):
            # every member holds the same basis (and int8 scales): stored once, as shared_bases.<group>[_scale]
            out.setdefault(BASIS_PREFIX + p.group + leaf.removeprefix("basis"), t)
            continue
        out[key] = t
    return out


def recover_leftovers(parent: str) -> None:
    """Clean up after saves into ``parent`` that were killed (:func:`rankserve.fsutil.recover_leftovers`)."""
    fsutil.recover_leftovers(parent, _TMP_PREFIX)


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
    checkpoint, old or new, at every instant (:func:`rankserve.fsutil.replace_dir`).
    ``tokenizer`` is a :class:`~rankserve.tokenizer.Tokenizer` (``None`` writes no tokenizer files).
    """
    out_dir = check_out_dir(out_dir, overwrite)
    parent, name = os.path.split(out_dir)
    validate_manifest(manifest)
    check_manifest_matches(model, manifest)
    if manifest["dtype"] != dtype_name(model_dtype(model)):
        raise CheckpointError(f"manifest dtype {manifest['dtype']} but the model is {model_dtype(model)}")
    tensors = _checkpoint_tensors(model)
    tmp = fsutil.owned_tempdir(f".{name}.tmp-", parent)
    try:
        os.chmod(
            tmp, fsutil.dir_mode()
        )  # mkdtemp makes it private (0700); a checkpoint is an ordinary directory
        if tokenizer is not None:
            tokenizer.save(tmp)  # first, so that nothing it writes can shadow our own files
        else:
            log.warning("saving %s without a tokenizer", out_dir)
        fsutil.write_json(os.path.join(tmp, CONFIG_NAME), model.config.to_hf())
        fsutil.write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
        meta = {"format": "pt", "rankserve_format_version": str(manifest["format_version"])}
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, meta)
        try:
            fsutil.replace_dir(tmp, out_dir, overwrite)
        except FileExistsError:  # created by someone else since check_out_dir
            raise CheckpointError(
                f"{out_dir} already exists; choose another path or pass --overwrite"
            ) from None
    finally:
        _remove_tree(tmp)  # after a swap it holds the old checkpoint; after a failure, the partial new one
    log.info("saved checkpoint %s (%d tensors)", out_dir, len(tensors))
    return out_dir


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _skeleton(cfg: ModelConfig, manifest: dict, where: str) -> nn.Module:
    """The model on the meta device with every projection replaced as the manifest says."""
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


def _checkpoint_name(projs: Mapping[str, Projection], key: str) -> str:
    """The checkpoint tensor a skeleton parameter comes from: a member's basis is its group's one tensor."""
    module, _, leaf = key.rpartition(".")
    p = projs.get(module)
    return BASIS_PREFIX + p.group if isinstance(p, SharedBasisLinear) and leaf == "basis" else key


def _expected_tensors(model: nn.Module, manifest: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for the skeleton (and the scales of its int8 tensors)."""
    projs = projections(model)
    expected = {_checkpoint_name(projs, k): s for k, s in meta_parameters(model).items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in int8.groups(manifest):
        expected["lm_head.weight"] = tuple(model.lm_head.weight.shape)  # stored on its own, int8
    for g, b in manifest["shared_bases"].items():
        expected[BASIS_PREFIX + g] = tuple(b["shape"])
    expected.update(int8.expected_scales(expected, manifest))
    return expected


def _check_tensors(tensors: Mapping, expected: Mapping, manifest: dict, where: str) -> None:
    check_names(tensors, expected, where, CheckpointError)
    quantized = int8.groups(manifest)
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) == shape:
            if name in quantized and t.dtype != torch.int8:
                raise CheckpointError(
                    f"{where}: tensor {name} has dtype {t.dtype}, but the manifest says int8"
                )
            if name not in quantized and not t.is_floating_point():
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
    int8.check_pairs(tensors, manifest, where)


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[nn.Module, dict]:
    """(model, manifest) from a checkpoint directory; every tensor is checked against the manifest.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, so the weights
    are materialised once (not at all on CPU when ``dtype`` is the stored dtype).
    """
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

    # An int8 matrix stays int8 with fp32 scales whatever ``dtype``: set_int8 makes it a buffer pair (one pair
    # object for every member of a shared basis), which takes it off the meta parameters that assign() fills.
    projs = projections(model)
    quantized = int8.groups(manifest)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod_name, mod in projs.items():
        for pname in mod.matrices:
            key = _checkpoint_name(projs, f"{mod_name}.{pname}")
            if key in quantized:
                if key not in pairs:
                    pairs[key] = (tensors[key].to(device), tensors[key + SCALE_SUFFIX].to(device))
                mod.set_int8(pname, *pairs[key], dtype)
    named = {k: tensors[_checkpoint_name(projs, k)] for k in meta_parameters(model)}
    # a tied head quantized on its own (--lm-head) is no longer the embedding
    assign(model, named, dtype, device, source=weights, tie="lm_head.weight" not in quantized)
    log.info(
        "loaded checkpoint %s (family %s, format %d)", path, manifest["family"], manifest["format_version"]
    )
    return model, manifest
