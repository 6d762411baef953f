"""A model folder vLLM can load: the Hugging Face Llama folder plus a tokenizer.

vLLM refuses a folder without a tokenizer. disagg's random-weight presets (``tiny``) have none: their 259-token
vocabulary is UTF-8 bytes 0-255 plus bos/eos/pad 256/257/258 (`engine.model.tokenizer.ByteTokenizer`). For such a
folder `vllm_model_dir` makes a sibling folder ``NAME-vllm`` whose weights and config are symlinks to the original
and whose ``tokenizer.json`` is a byte-level BPE without merges mapping byte ``b`` to id ``b`` — so text encodes to
the same ids as `ByteTokenizer`. The original folder is left untouched (adding a tokenizer.json there would change
how the built-in engine tokenizes). Folders that already carry a tokenizer are returned as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

BYTE_VOCAB = 259
SPECIALS = {"<s>": 256, "</s>": 257, "<pad>": 258}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_byte_tokenizer(folder: Path) -> None:
    """Write ``tokenizer.json`` (byte-level BPE, id == byte value, specials 256-258) and ``tokenizer_config.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    assert tok.get_vocab_size(with_added_tokens=True) == BYTE_VOCAB
    assert tok.token_to_id("</s>") == SPECIALS["</s>"]
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 20}, indent=2) + "\n")


def vllm_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` if it has a tokenizer, else its ``-vllm`` sibling with one (created once; safe against races).

    Raises ValueError for a folder without a tokenizer whose vocabulary is not the 259-token byte vocabulary.
    """
    src = Path(model_dir).resolve()
    if (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file():
        return src
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("vocab_size") != BYTE_VOCAB:
        raise ValueError(f"{src}: vLLM needs a tokenizer (tokenizer.json) and this folder has none; only the "
                         f"{BYTE_VOCAB}-token byte vocabulary of disagg's presets gets one generated")
    dst = src.with_name(src.name + "-vllm")
    if (dst / "tokenizer.json").is_file():
        return dst
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=src.parent))
    for f in src.iterdir():
        os.symlink(f, tmp / f.name)
    write_byte_tokenizer(tmp)
    try:
        tmp.rename(dst)
    except OSError:  # another process made it first; identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
