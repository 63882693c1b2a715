"""Stand-in classes pickled under the SVD-LLM authors' class names, and stand-in tokenizers (SentencePiece proto,
fast-tokenizer JSON, pickled HF tokenizers), so a fixture pickle is what torch.save would write for the real objects."""

from __future__ import annotations

import copyreg
import io
import pickle
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------
# SVD-LLM: a pickled whole model, written with stand-in classes


class StandIn:
    """Base of the stand-ins: takes any constructor args, stores any pickled state."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._pickled_state = state


_STANDINS: dict[str, type] = {}


def standin(qualified: str) -> type:
    """A class that pickles as ``qualified`` (e.g. ``component.svd_llama.SVD_LlamaAttention``)."""
    if qualified not in _STANDINS:
        module, _, name = qualified.rpartition(".")
        _STANDINS[qualified] = type(name, (StandIn,), {"__module__": module, "__qualname__": name})
    return _STANDINS[qualified]


def new(qualified: str, **attrs: Any) -> StandIn:
    obj = standin(qualified)()
    obj.__dict__.update(attrs)
    return obj


class StandInPickler(pickle._Pickler):
    """Writes stand-in classes as plain GLOBALs; the real classes are never imported."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, StandIn) and obj is not StandIn:
            self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


STANDIN_PICKLE = types.SimpleNamespace(__name__="standin_pickle", Pickler=StandInPickler)


class StandInUnpickler(pickle.Unpickler):
    """Reads a stand-in pickle back for the reference forward (trusted fixture files only)."""

    _REAL = ("torch", "collections", "builtins", "__builtin__", "_codecs", "copyreg")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self._REAL and not module.startswith("torch.nn"):
            return super().find_class(module, name)
        return standin(f"{module}.{name}")


STANDIN_UNPICKLE = types.SimpleNamespace(
    __name__="standin_unpickle", Unpickler=StandInUnpickler, load=pickle.load
)


def _module(
    qualified: str,
    params: dict | None = None,
    buffers: dict | None = None,
    children: dict | None = None,
    non_persistent: set | None = None,
    **attrs: Any,
) -> StandIn:
    """A stand-in with the ``__dict__`` layout of an ``nn.Module`` (what torch pickles for a module)."""
    return new(
        qualified,
        training=False,
        _parameters=OrderedDict(params or {}),
        _buffers=OrderedDict(buffers or {}),
        _non_persistent_buffers_set=set(non_persistent or ()),
        _modules=OrderedDict(children or {}),
        **attrs,
    )


def _linear(weight: Tensor, bias: Tensor | None = None, stale_in: int | None = None) -> StandIn:
    # SVD-LLM swaps weight.data after construction, so in/out_features can be stale: never trusted by the reader.
    return _module(
        "torch.nn.modules.linear.Linear",
        params={"weight": torch.nn.Parameter(weight, requires_grad=False), "bias": bias},
        in_features=stale_in or weight.shape[1],
        out_features=weight.shape[0],
    )


def _rotary(head_dim: int, base: float = 10000.0, positions: int = 16) -> StandIn:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(torch.arange(positions).float(), inv_freq)] * 2, dim=-1)
    return _module(
        "component.svd_llama.LlamaRotaryEmbedding",
        buffers={
            "inv_freq": inv_freq,
            "cos_cached": emb.cos()[None, None],
            "sin_cached": emb.sin()[None, None],
        },
        non_persistent={"cos_cached", "sin_cached"},
        max_seq_len_cached=positions,
    )


SP_TEXT = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234 + 5678 = 6912",
    "low-rank models serve faster than dense ones",
    "rankserve imports public checkpoints safely",
] * 20


def sentencepiece_proto() -> bytes:
    """A tiny Llama-style SentencePiece BPE model (identity normalization, byte fallback)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def fast_tokenizer_json() -> str:
    """A tiny ``tokenizers`` BPE tokenizer (with a BOS post-processor) as its JSON state."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SP_TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def _added_token(content: str) -> StandIn:
    return new(
        "tokenizers.AddedToken",
        content=content,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=True,
    )


class _PickledTokenizer(StandIn):
    """``tokenizers.Tokenizer`` pickles as NEWOBJ(Tokenizer, (model,)) + BUILD(json bytes)."""

    def __init__(self, json_text: str):
        self.json_text = json_text

    def __reduce_ex__(self, protocol: int):
        model = new("tokenizers.models.Model")
        return copyreg.__newobj__, (type(self), model), self.json_text.encode()


_PickledTokenizer.__module__, _PickledTokenizer.__qualname__ = "tokenizers", "Tokenizer"
_STANDINS["tokenizers.Tokenizer"] = _PickledTokenizer


def _pickled_tokenizer(kind: str | None, sp_proto: bytes | None = None) -> Any:
    specials = {
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
    }
    if kind == "slow":
        return new(
            "transformers.models.llama.tokenization_llama.LlamaTokenizer",
            init_kwargs=dict(specials, add_bos_token=True, add_eos_token=False, legacy=True),
            sp_model=None,
            sp_model_proto=sp_proto if sp_proto is not None else sentencepiece_proto(),
            add_bos_token=True,
            add_eos_token=False,
            legacy=True,
            vocab_file="/home/author/llama/tokenizer.model",
            **{f"_{k}": v for k, v in specials.items()},
        )
    if kind == "fast":
        return new(
            "transformers.models.llama.tokenization_llama_fast.LlamaTokenizerFast",
            init_kwargs=dict(specials),
            _tokenizer=_PickledTokenizer(fast_tokenizer_json()),
            **{f"_{k}": v for k, v in specials.items()},
        )
    return None
