"""A character-level tokenizer for the tiny preset (the real Ring tokenizer cannot be
downloaded here). Saved as `tokenizer.json` beside the weights; any local HF tokenizer
directory loads through `load_tokenizer` the same way."""
from __future__ import annotations

import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = string.digits + string.ascii_letters + " +-*/=().,:;?!#$%&^_{}[]\\|<>'\"\n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A local tokenizer directory (tokenizer.json / tokenizer_config.json); never a hub id."""
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
