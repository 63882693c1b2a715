"""A tiny char-level tokenizer for tests: one id per printable ASCII character, BOS added like Llama's."""

from __future__ import annotations

import string

from rankserve.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: bos 1 and eos 2, as tiny.py's configs say
CHARS = sorted(set(string.printable) - set("\x0b\x0c"))  # 98 characters, so the vocab fits 128 embeddings
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer() -> Tokenizer:
    """Char-level WordLevel tokenizer (Fuse decoder) in a PreTrainedTokenizerFast, eos ``</s>``."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    raw = RawTokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    raw.decoder = decoders.Fuse()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    return Tokenizer(hf=hf, eos_ids=[2])
