"""Transformer shapes the cost models need: `ModelSpec`, its presets and `from_hf_config`.

Sources: each preset's numbers are those of the model's Hugging Face ``config.json`` (see ../shared/REFERENCE.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from sim.jsonfile import read_json

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only (Llama-family) transformer.

    ``dtype_bytes`` is the size of one weight / KV element (2 for bf16). ``max_context_tokens`` is the longest sequence the
    model accepts (prompt + output).
    """

    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    max_context_tokens: int = 131072
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("layers", "hidden_size", "heads", "kv_heads", "head_dim", "intermediate_size", "vocab_size",
                    "dtype_bytes", "max_context_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelSpec {self.name!r}: {key} must be positive, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelSpec {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache one token occupies, all layers: 2 x layers x kv_heads x head_dim x dtype_bytes (GQA-aware)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def params(self) -> int:
        """Number of weights (embeddings, attention, SwiGLU MLP, norms, LM head)."""
        h, q, kv = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.layers * per_layer + emb + head + h

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul for every token (all but the input embedding table)."""
        return self.params - self.vocab_size * self.hidden_size + (self.vocab_size * self.hidden_size
                                                                    if self.tie_word_embeddings else 0)

    def with_dtype(self, dtype: str) -> ModelSpec:
        """The same shapes with another element type (``bf16``, ``fp32``, ``fp8`` ...)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        return ModelSpec(**{**asdict(self), "dtype_bytes": DTYPE_BYTES[dtype]})

    def to_dict(self) -> dict:
        return asdict(self)


def from_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (or the folder holding it) into a `ModelSpec`.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the missing or bad key.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such config.json")
    cfg = read_json(p, obj=True)

    def need(key: str) -> int:
        if key not in cfg:
            raise ValueError(f"{p}: missing key {key!r}")
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{p}: key {key!r} must be a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return ModelSpec(
        name=name or cfg.get("_name_or_path") or p.parent.name,
        layers=need("num_hidden_layers"),
        hidden_size=hidden,
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        dtype_bytes=DTYPE_BYTES.get(dtype, 2),
        max_context_tokens=int(cfg.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, max_context_tokens=4096),
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, max_context_tokens=32768),
        ModelSpec("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32768, max_context_tokens=32768),
        ModelSpec("qwen3-32b", 64, 5120, 64, 8, 128, 25600, 151936, max_context_tokens=40960),
        # The engine's built-in CPU model: Llama architecture, random weights, byte-level vocabulary (256 bytes + 3 specials).
        ModelSpec("tiny", 4, 512, 8, 2, 64, 1408, 259, dtype_bytes=2, max_context_tokens=2048),
    ]
}


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name (case-insensitive) or a Hugging Face folder / config.json path."""
    key = name_or_path.lower()
    if key in PRESETS:
        return PRESETS[key]
    p = Path(name_or_path)
    if p.exists():
        return from_hf_config(p)
    raise ValueError(f"unknown model {name_or_path!r}: expected a preset ({', '.join(sorted(PRESETS))}) "
                     "or a path to a Hugging Face config.json / model folder")
