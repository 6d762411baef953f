"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and the
``bos_id`` / ``eos_id`` / ``vocab_size`` attributes.

`ByteTokenizer` serves the built-in tiny model (UTF-8 bytes 0-255 are ids 0-255; bos 256, eos 257, pad 258).
`HFTokenizer` wraps a Hugging Face ``tokenizer.json`` via the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, plus specials bos=256, eos=257, pad=258 (vocab 259).

    ``decode`` drops special ids and replaces invalid UTF-8 (e.g. a cut-off multi-byte character) with U+FFFD.
    """

    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``. ``encode`` adds no special tokens; ``decode`` skips them.

    bos / eos ids come from the folder's ``config.json`` when present.
    """

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _HF

        self._tok = _HF.from_file(str(path))
        self.bos_id, self.eos_id = bos_id, eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The folder's ``tokenizer.json`` if it has one, else `ByteTokenizer` for a 259-token vocabulary.

    Raises ``FileNotFoundError`` naming the folder when neither applies.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if (folder / "tokenizer.json").is_file():
        eos = cfg.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        return HFTokenizer(folder / "tokenizer.json", cfg.get("bos_token_id"), eos)
    if cfg.get("vocab_size") == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise FileNotFoundError(f"{folder}: no tokenizer.json, and vocab_size {cfg.get('vocab_size')} is not the "
                            f"byte-level {ByteTokenizer.vocab_size}")
