"""A small tokenizer facade over a Hugging Face tokenizer: encode, chat template, incremental decoding."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field

from rankserve.errors import InputError
from rankserve.fsutil import cache_dir, owned_tempdir


@dataclass
class Tokenizer:
    hf: object  # a transformers PreTrainedTokenizer(Fast); only this module touches it
    eos_ids: list[int] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        pid = self.hf.pad_token_id
        return int(pid) if pid is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered through the model's own chat template."""
        if not self.has_chat_template:
            raise InputError(
                "this model's tokenizer has no chat template; drop --chat and pass a plain prompt"
            )
        ids = self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def save(self, directory: str) -> None:
        self.hf.save_pretrained(directory)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences.

    Decoding token by token breaks multi-byte characters and SentencePiece spaces, so it re-decodes a short
    window since the last emitted offset and emits only what became stable.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window used as context
        self.read_offset = 0  # ids up to here are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # wait for the rest of a multi-byte character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


def load_hf_tokenizer(
    directory: str, gguf_file: str | None = None, eos_ids: list[int] | None = None
) -> Tokenizer:
    """The tokenizer (and chat template) stored with a model: tokenizer files in a directory, or inside a GGUF.

    Converting a GGUF vocabulary takes ~10 s, so the converted tokenizer is cached on disk, keyed by the file's
    path, size and modification time.
    """
    from transformers import AutoTokenizer

    hf = None
    if gguf_file:
        path = os.path.realpath(os.path.join(directory, gguf_file))
        st = os.stat(path)
        key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir("tokenizers", key)
        if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
            try:
                hf = AutoTokenizer.from_pretrained(cached)
            except Exception:  # a damaged cache entry is rebuilt, never fatal
                hf = None
        if hf is None:
            hf = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
            _save_atomically(hf, cached)
    else:
        hf = AutoTokenizer.from_pretrained(directory)
    ids = list(eos_ids or [])
    if hf.eos_token_id is not None and hf.eos_token_id not in ids:
        ids.append(int(hf.eos_token_id))
    return Tokenizer(hf=hf, eos_ids=ids)


def _save_atomically(hf, target: str) -> None:
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = owned_tempdir(".tmp-", os.path.dirname(target))  # a killed run's copy is swept by the next
        hf.save_pretrained(tmp)
        os.replace(tmp, target) if not os.path.exists(target) else shutil.rmtree(tmp)
    except OSError:  # a read-only cache only costs speed
        pass
