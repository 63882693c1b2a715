"""Rebuild the tokenizer pickled inside an SVD-LLM checkpoint: a ``tokenizers`` JSON state as it is, or a
SentencePiece BPE model from its serialized proto (vocabulary read by hand, merges derived from it)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankserve.fsutil import owned_tempdir
from rankserve.importers.unpickler import Record

_TOKENIZER_SAMPLES = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234 + 5678 = 6912",
    "low-rank models serve faster",
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Record):  # tokenizers.AddedToken or transformers' AddedToken
        content = value.get("content")
        return content if isinstance(content, str) else None
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(tok_rec: Record) -> dict[str, str]:
    init_kwargs = tok_rec.get("init_kwargs") or {}
    specials: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        for value in (
            init_kwargs.get(name) if isinstance(init_kwargs, Mapping) else None,
            tok_rec.get(f"_{name}"),
        ):
            text = _token_text(value)
            if text:
                specials[name] = text
                break
    return specials


# The SentencePiece ModelProto is read by hand (three fields, ~60 lines) rather than with a library:
# - the bytes come from an untrusted pickle, and this reader bounds the proto's size, each piece's length and
#   each varint before any work, where sentencepiece's C++ parser or protobuf's would have to be trusted whole;
# - sentencepiece cannot say which model type a proto is (only its protobuf module can, and that needs
#   protobuf, which rankserve does not install), and the rebuild is only right for BPE;
# - both would become runtime dependencies of one rare import path. When sentencepiece is installed (the test
#   extra), the rebuilt tokenizer is checked against it below.
_MAX_PROTO_BYTES = 16 << 20  # Llama's tokenizer.model is 0.5 MB, Gemma's 4 MB


_MAX_PIECE_CHARS = 256  # SentencePiece learns pieces of at most 16 characters by default


_MAX_VARINT_BYTES = 10  # a 64-bit varint; more is corrupt, and an endless one would grow a huge int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        if shift >= 7 * _MAX_VARINT_BYTES:
            raise ValueError("malformed protobuf varint (longer than 10 bytes)")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; enough to read a SentencePiece model."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _sentencepiece_vocab(proto: bytes) -> tuple[dict[str, int], bool]:
    """(piece -> id, add_dummy_prefix) from a serialized SentencePiece ModelProto; BPE models only."""
    if len(proto) > _MAX_PROTO_BYTES:
        raise ValueError(f"sp_model_proto is {len(proto):,} bytes, more than {_MAX_PROTO_BYTES:,}")
    pieces: list[str] = []
    model_type, add_dummy_prefix = 1, True  # proto defaults: UNIGRAM, prefix on
    for number, wire, value in _proto_fields(proto):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces
            piece = next((v for n, w, v in _proto_fields(value) if n == 1 and w == 2), b"").decode("utf-8")
            if len(piece) > _MAX_PIECE_CHARS:
                # Finding a piece's merges tries every split, so its cost grows with the square of its length.
                raise ValueError(
                    f"piece {len(pieces)} has {len(piece):,} characters, more than {_MAX_PIECE_CHARS}"
                )
            pieces.append(piece)
        elif number == 2 and wire == 2:  # TrainerSpec
            model_type = next((v for n, w, v in _proto_fields(value) if n == 3 and w == 0), model_type)
        elif number == 3 and wire == 2:  # NormalizerSpec
            add_dummy_prefix = bool(next((v for n, w, v in _proto_fields(value) if n == 3 and w == 0), 1))
    if model_type != 2:
        raise ValueError(f"SentencePiece model type {model_type} is not BPE")
    return {piece: i for i, piece in enumerate(pieces)}, add_dummy_prefix


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    # A SentencePiece BPE vocab lists merged pieces in merge order, so every split of a piece into two known
    # pieces is a merge ranked by the merged piece's id.
    merges = []
    for piece, pid in vocab.items():
        splits = [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((pid, left, right) for left, right in splits)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
    return [(left, right) for _, left, right in merges]


def _tokenizer_from_sentencepiece(tok_rec: Record, proto: bytes, notes: list[str]):
    from transformers import LlamaTokenizer

    vocab, add_dummy_prefix = _sentencepiece_vocab(proto)
    specials = _special_tokens(tok_rec)
    add_bos = tok_rec.get("add_bos_token", True)
    add_eos = tok_rec.get("add_eos_token", False)
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(vocab),
        legacy=bool(tok_rec.get("legacy", True)),
        add_prefix_space=add_dummy_prefix,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        **{k: v for k, v in specials.items() if k != "pad_token"},
    )
    try:
        import sentencepiece
    except ImportError:
        notes.append(
            "tokenizer rebuilt from sp_model_proto but not verified (sentencepiece is not installed)"
        )
        return tok
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    for text in _TOKENIZER_SAMPLES:
        expected = ([sp.bos_id()] if add_bos else []) + sp.encode(text) + ([sp.eos_id()] if add_eos else [])
        if tok(text).input_ids != expected:
            raise ValueError(f"rebuilt tokenizer disagrees with sentencepiece on {text!r}")
    notes.append("tokenizer rebuilt from the pickled sp_model_proto and checked against sentencepiece")
    return tok


def _tokenizer_from_json(tok_rec: Record, state: bytes | str, notes: list[str]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = state.decode("utf-8") if isinstance(state, bytes) else state
    backend = Tokenizer.from_str(text)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **_special_tokens(tok_rec))
    for sample in _TOKENIZER_SAMPLES:
        if tok(sample).input_ids != backend.encode(sample).ids:
            raise ValueError(f"rebuilt tokenizer disagrees with the pickled one on {sample!r}")
    notes.append("tokenizer rebuilt from the pickled tokenizers.Tokenizer JSON")
    return tok


def recover_tokenizer(tok_rec: Any, notes: list[str]) -> str | None:
    """Rebuild the pickled tokenizer into a temporary directory; None (with a note) when that is not possible."""
    if not isinstance(tok_rec, Record):
        notes.append("no pickled tokenizer: pass --tokenizer")
        return None
    inner = tok_rec.get("_tokenizer")
    proto = tok_rec.get("sp_model_proto")
    try:
        if isinstance(inner, Record) and isinstance(inner.state, (bytes, str)):
            tok = _tokenizer_from_json(tok_rec, inner.state, notes)
        elif isinstance(proto, bytes):
            tok = _tokenizer_from_sentencepiece(tok_rec, proto, notes)
        else:
            notes.append(f"cannot rebuild the pickled {tok_rec.qualname}: pass --tokenizer")
            return None
    except Exception as e:  # noqa: BLE001 - any failure here only means "ask the user for a tokenizer"
        notes.append(
            f"cannot rebuild the pickled {tok_rec.qualname} ({type(e).__name__}: {e}): pass --tokenizer"
        )
        return None
    directory = owned_tempdir("rankserve-tokenizer-")  # pid-tagged: a killed import's copy is swept
    try:
        tok.save_pretrained(directory)
        if isinstance(proto, bytes):
            Path(directory, "tokenizer.model").write_bytes(proto)
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(directory, ignore_errors=True)
        notes.append(f"cannot write the rebuilt tokenizer ({type(e).__name__}: {e}): pass --tokenizer")
        return None
    notes.append(f"tokenizer written to temporary directory {directory} (the caller owns it)")
    return directory
