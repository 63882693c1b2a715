"""What the readers share: the base config cleaned of family keys, weight files, provenance, and the sort of every
projection into dense or a pair of factors."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rankserve.config import SUPPORTED_MODEL_TYPES, ConfigError
from rankserve.hashing import file_sha256
from rankserve.importers.errors import CheckpointImportError
from rankserve.importers.model import PROJ_KINDS, ImportedModel, Layout, SharedGroup, expect, orient, shape_of
from rankserve.importers.state_dict import load_state_dict, read_weight_files
from rankserve.io import hf_files
from rankserve.io.assign import listed
from rankserve.io.safetensors import load_mmap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# Buffers a pickled or exported model may carry that hold no weights (recomputed from the config).
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


# Config keys that only mean something to one family's code; never written into the base config.
_FAMILY_KEYS = {
    "auto_map",
    "truncation_ranks",
    "low_rank_config",
    "low_rank_modules",
    "low_rank_method",
    "low_rank_schema",
    "low_rank_format_version",
    "dobi_target_modules",
    "transformers_version",
}


_FAMILY_KEY_RE = re.compile(rf"^(({'|'.join(PROJ_KINDS)})_groups|num_basis_({'|'.join(PROJ_KINDS)}))$")


# Attributes every transformers 4.x PretrainedConfig instance carries; a pickled config holds them all, a saved
# config.json only the non-default ones. They describe generation or training, not the model.
PRETRAINED_RUNTIME_KEYS = {
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "task_specific_params",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sep_token_id",
    "decoder_start_token_id",
}


def check_architecture(config: Mapping, source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = config.get("architectures") or []
        raise CheckpointImportError(
            f"not supported: {source} is model_type {model_type!r} ({', '.join(map(str, archs)) or 'no architectures'}); "
            f"rankserve imports {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    return model_type


def _jsonable(value: Any) -> tuple[bool, Any]:
    """(ok, value) with torch dtypes turned into their names; ok is False for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, torch.dtype):
        return True, str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if isinstance(value, Mapping):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return False, None


def clean_config(raw: Mapping, model_type: str, notes: list[str], drop: set[str] = frozenset()) -> dict:
    """The base HF config: family keys, private keys and ``drop`` removed, architectures set to the base class."""
    config: dict = {}
    for key, value in raw.items():
        if key.startswith("_") or key in _FAMILY_KEYS or _FAMILY_KEY_RE.match(key) or key in drop:
            continue
        ok, clean = _jsonable(value)
        if not ok:
            notes.append(f"config key {key!r} dropped: its value is not plain data")
            continue
        config[key] = clean
    config["model_type"] = model_type
    config["architectures"] = [SUPPORTED_MODEL_TYPES[model_type].hf_class]
    return config


def read_config(directory: Path) -> dict:
    """The raw ``config.json`` of a checkpoint directory (:func:`rankserve.io.hf_files.read_config`)."""
    try:
        return hf_files.read_config(str(directory))
    except ConfigError as e:
        raise CheckpointImportError(str(e)) from None


def _normalise_module(name: str) -> str:
    # lowrankarena writes module names with or without the leading "model."
    return name if name.startswith("model.") or name == "lm_head" else f"model.{name}"


def declared_ranks(table: Any, key: str, source: str, geometry: Layout) -> dict[str, int]:
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise CheckpointImportError(
            f"{source}: config {key} must map module names to ranks, found {type(table).__name__}"
        )
    projections = geometry.projections
    ranks: dict[str, int] = {}
    for name, rank in table.items():
        if isinstance(rank, Mapping):  # {"rank": r}
            rank = rank.get("rank")
        module = _normalise_module(str(name))
        if module not in projections:
            raise CheckpointImportError(
                f"{source}: config {key} names {name!r}, which is not a projection of this model"
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise CheckpointImportError(
                f"{source}: config {key}[{name!r}] must be a positive int, found {rank!r}"
            )
        ranks[module] = rank
    return ranks


def weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory (:func:`rankserve.io.hf_files.weight_files`), as paths."""
    try:
        return [Path(p) for p in hf_files.weight_files(str(directory))]
    except (OSError, ConfigError) as e:
        raise CheckpointImportError(str(e)) from None


def weight_keys(files: list[Path]) -> list[str]:
    """Tensor names, without reading the tensors where the format allows it (used by detect_format)."""
    keys: list[str] = []
    for path in files:
        if path.suffix == ".safetensors":
            keys.extend(load_mmap(str(path)))  # validates the header; the map reads no tensor data
        else:
            keys.extend(load_state_dict(path))
    return keys


def as_directory(src: str | Path) -> tuple[Path, list[Path] | None]:
    """(directory, explicit weight files or None): ``src`` is an HF directory or one weight file inside one."""
    path = Path(src)
    if path.is_dir():
        return path, None
    if path.is_file() and (path.suffix in (".safetensors", ".bin")):
        return path.parent, [path]
    raise CheckpointImportError(f"{src}: expected a checkpoint directory or a .safetensors/.bin file in one")


def tokenizer_dir(directory: Path) -> str | None:
    return str(directory) if any((directory / name).is_file() for name in TOKENIZER_FILES) else None


def source_provenance(
    source: Path, fmt: str, files: list[Path], raw_config: Mapping, notes: list[str]
) -> dict:
    base = source if source.is_dir() else source.parent
    return {
        "source": str(source.resolve()),
        "format": fmt,
        "sha256": {str(f.resolve().relative_to(base.resolve())): file_sha256(f) for f in files},
        "original_architectures": list(raw_config.get("architectures") or []),
        "notes": notes,
    }


FactorKeys = Callable[[str], tuple[str, str, tuple[str, ...]]]


@dataclass
class Split:
    dense: dict[str, Tensor]
    lowrank: dict[str, tuple[Tensor, Tensor, Tensor | None]]
    consumed: set[str]


def take_bias(
    state: Mapping[str, Tensor],
    keys: tuple[str, ...],
    out: int,
    consumed: set[str],
    geometry: Layout,
    module: str,
) -> Tensor | None:
    """The projection's bias under the first of ``keys`` present; present exactly when the config says so."""
    key = next((k for k in keys if k in state), None)
    if key is None:
        if geometry.has_bias(module):
            raise CheckpointImportError(
                f"missing tensor: {keys[0]} ({geometry.model_type} {module} has a bias)"
            )
        return None
    if not geometry.has_bias(module):
        raise CheckpointImportError(
            f"{key}: unexpected bias, the config gives {geometry.model_type} {module} no bias"
        )
    consumed.add(key)
    return expect(key, state[key], (out,))


def split_projections(
    state: Mapping[str, Tensor],
    geometry: Layout,
    factor_keys: FactorKeys,
    declared: Mapping[str, int],
    rank_source: str,
    notes: list[str],
    handled: frozenset[str] = frozenset(),
) -> Split:
    """Sort every projection into dense or low-rank, checking shapes and declared ranks; take embeddings and norms.

    Modules in ``handled`` were already taken by the caller and are skipped.
    """
    split = Split({}, {}, set())
    swapped: list[str] = []
    for module, (out, inn) in geometry.projections.items():
        if module in handled:
            continue
        u_key, v_key, bias_keys = factor_keys(module)
        if u_key in state or v_key in state:
            for key in (u_key, v_key):
                if key not in state:
                    partner = v_key if key == u_key else u_key
                    raise CheckpointImportError(f"missing tensor: {key} (its partner {partner} is present)")
            u, v, was_swapped = orient(module, u_key, state[u_key], v_key, state[v_key], out, inn)
            if was_swapped:
                swapped.append(module)
            rank = u.shape[1]
            if module in declared and declared[module] != rank:
                raise CheckpointImportError(
                    f"{module}: {rank_source} declares rank {declared[module]}, found rank {rank} "
                    f"in {u_key} {shape_of(state[u_key])} and {v_key} {shape_of(state[v_key])}"
                )
            split.consumed.update((u_key, v_key))
            bias = take_bias(state, bias_keys or (f"{module}.bias",), out, split.consumed, geometry, module)
            split.lowrank[module] = (u, v, bias)
        elif f"{module}.weight" in state:
            if module in declared:
                raise CheckpointImportError(
                    f"{module}: {rank_source} declares rank {declared[module]}, but the checkpoint holds a dense "
                    f"{module}.weight and no factors {u_key} / {v_key}"
                )
            key = f"{module}.weight"
            split.dense[key] = expect(key, state[key], (out, inn))
            split.consumed.add(key)
            bias = take_bias(state, (f"{module}.bias",), out, split.consumed, geometry, module)
            if bias is not None:
                split.dense[f"{module}.bias"] = bias
        elif module == "lm_head" and geometry.tied:
            continue
        else:
            raise CheckpointImportError(
                f"missing tensor: {module}.weight (dense) or {u_key} + {v_key} (factors) for {module}"
            )
    for key, shape in geometry.other_dense.items():
        if key not in state:
            raise CheckpointImportError(f"missing tensor: {key} (expected shape {list(shape)})")
        split.dense[key] = expect(key, state[key], shape)
        split.consumed.add(key)
    if swapped:
        notes.append(
            f"{len(swapped)} projections store their factors the other way round from their names "
            f"(e.g. {swapped[0]}); oriented by shape"
        )
    return split


def reject_leftovers(state: Mapping[str, Tensor], consumed: set[str], what: str, source: str) -> None:
    leftover = sorted(k for k in state if k not in consumed and not _IGNORED_KEYS.search(k))
    if leftover:
        raise CheckpointImportError(
            f"{source}: unexpected tensors for a {what} checkpoint: {listed(leftover, 5)}"
        )


def _measured_ratio(geometry: Layout, split: Split, shared: Mapping[str, SharedGroup]) -> float:
    """Fraction of projection parameters removed (rankserve's ``ratio``), measured from tensor shapes."""
    dense_params = stored = 0
    for module, (out, inn) in geometry.projections.items():
        if module == "lm_head" and module not in split.lowrank:
            continue  # a dense lm_head is outside what the families compress
        dense_params += out * inn
        if module in split.lowrank:
            u, v, _ = split.lowrank[module]
            stored += u.numel() + v.numel()
        elif f"{module}.weight" in split.dense:
            stored += out * inn
    for group in shared.values():
        stored += group.basis.numel() + sum(c.numel() for c, _ in group.members.values())
    return round(1.0 - stored / dense_params, 6)


def finish(
    family: str,
    config: dict,
    geometry: Layout,
    split: Split,
    shared: dict[str, SharedGroup],
    provenance: dict,
    tokenizer_dir: str | None,
) -> ImportedModel:
    model = ImportedModel(family, config, split.dense, split.lowrank, shared, provenance, tokenizer_dir)
    provenance["ranks"] = model.ranks()
    provenance["ratio"] = _measured_ratio(geometry, split, shared)
    tensors = [*split.dense.values(), *(t for f in split.lowrank.values() for t in f if t is not None)]
    for group in shared.values():
        tensors.append(group.basis)
        tensors.extend(t for m in group.members.values() for t in m if t is not None)
    provenance["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return model


def user_tokenizer(tokenizer: str | Path | None) -> str | None:
    if tokenizer is None:
        return None
    if not Path(tokenizer).exists():
        raise CheckpointImportError(f"tokenizer path {tokenizer} does not exist")
    return str(tokenizer)


def read_factored_directory(
    src: str | Path,
    tokenizer: str | Path | None,
    family: str,
    factor_keys: FactorKeys,
    rank_table: Callable[[dict], tuple[Any, str]],
) -> ImportedModel:
    directory, files = as_directory(src)
    raw = read_config(directory)
    model_type = check_architecture(raw, str(src))
    geometry = Layout.from_config(raw, str(src))
    table, rank_source = rank_table(raw)
    declared = declared_ranks(table, rank_source, str(src), geometry)
    files = files or weight_files(directory)
    state = read_weight_files(files)
    notes: list[str] = []
    split = split_projections(state, geometry, factor_keys, declared, f"config {rank_source}", notes)
    reject_leftovers(state, split.consumed, family, str(src))
    remote_code = sorted(p.name for p in directory.glob("*.py"))
    if remote_code:
        notes.append(f"ignored remote code (never imported): {', '.join(remote_code)}")
    config = clean_config(raw, model_type, notes)
    provenance = source_provenance(Path(src), family, [directory / "config.json", *files], raw, notes)
    tok = user_tokenizer(tokenizer) or tokenizer_dir(directory)
    return finish(family, config, geometry, split, {}, provenance, tok)
