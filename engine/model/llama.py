"""A compact Llama-architecture decoder in torch: RMSNorm, RoPE (default and llama3 scaling), grouped-query attention,
SwiGLU MLP, LM head (optionally tied to the embeddings).

The model works on *packed* tokens: one flat batch of ``N`` tokens from any number of sequences, each with its absolute
position. How attention reads and writes the KV cache is not the model's business: ``forward`` takes an ``attend``
callable (see `engine.model.attention`) that receives one layer's rotated q, k, v and returns the attention output.

Numerics follow Hugging Face's ``LlamaForCausalLM`` (RMSNorm in fp32, cos/sin computed in fp32 and cast to the compute
dtype, rotate-half RoPE), so logits agree with transformers on the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sim.model_spec import ModelSpec

# attend(layer, q [N, heads, head_dim], k [N, kv_heads, head_dim], v [N, kv_heads, head_dim]) -> [N, heads, head_dim]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (``rope_type: llama3`` in the Hugging Face config)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture model (the subset of Hugging Face's ``config.json`` we use).

    ``rope_scaling`` is None for plain RoPE. ``attention_bias`` adds biases to the q/k/v/o projections.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_spec(cls, spec: ModelSpec, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5) -> LlamaConfig:
        """The Llama config with a `ModelSpec`'s shapes (plain RoPE, no biases)."""
        return cls(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                   num_layers=spec.layers, num_heads=spec.heads, num_kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                   max_position_embeddings=spec.max_context_tokens, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
                   tie_word_embeddings=spec.tie_word_embeddings)

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> LlamaConfig:
        """Parse a Hugging Face ``config.json`` dict; ``source`` (the file) is named in every error.

        Accepts transformers v4 (``rope_theta`` + ``rope_scaling``) and v5 (``rope_parameters``) RoPE fields.
        Raises ``ValueError`` for an unsupported architecture, activation, RoPE type or sliding window, or a missing key.
        """
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and cfg.get("model_type") not in ("llama", "mistral"):
            raise ValueError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        window = cfg.get("sliding_window")
        if window is not None and window < cfg.get("max_position_embeddings", 0):
            raise ValueError(f"{source}: sliding-window attention (sliding_window={window}) is not supported")

        def need(key: str):
            if key not in cfg:
                raise ValueError(f"{source}: missing key {key!r}")
            return cfg[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = Llama3RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                            float(rope["high_freq_factor"]),
                                            int(rope["original_max_position_embeddings"]))
            except KeyError as e:
                raise ValueError(f"{source}: llama3 rope scaling lacks key {e.args[0]!r}") from e
        elif rope_type != "default":
            raise ValueError(f"{source}: unsupported RoPE type {rope_type!r} (supported: default, llama3)")
        return cls(vocab_size=int(need("vocab_size")), hidden_size=hidden,
                   intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)))

    def to_hf(self) -> dict:
        """A Hugging Face ``config.json`` dict (LlamaForCausalLM) readable by transformers v4 and v5 and by `from_hf`."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope, "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        }


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, fp32 ``[head_dim // 2]``, with llama3 scaling applied when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                                   - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x ``[N, heads, head_dim]``; cos, sin ``[N, 1, head_dim // 2]`` in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight ``[hidden]``."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block: GQA self-attention + SwiGLU MLP, with fused qkv and gate/up weights."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.post_attention_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.qkv_proj = param(self.q_size + 2 * self.kv_size, h)  # rows: q | k | v
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o_proj = param(h, self.q_size)
        self.o_bias = param(h) if cfg.attention_bias else None
        self.gate_up_proj = param(2 * cfg.intermediate_size, h)  # rows: gate | up
        self.down_proj = param(h, cfg.intermediate_size)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        """``x``: [M, hidden], the N real tokens first (``cos``/``sin`` have N rows) and M - N zero rows of GEMM
        padding (see `gemm_rows`), which the projections carry and attention never sees."""
        m, n = x.shape[0], cos.shape[0]
        qkv = F.linear(self.input_norm(x), self.qkv_proj, self.qkv_bias)[:n]  # [N, q_size + 2 kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(n, self.heads, self.head_dim), cos, sin)  # [N, heads, head_dim]
        k = apply_rope(k.view(n, self.kv_heads, self.head_dim), cos, sin)  # [N, kv_heads, head_dim]
        v = v.view(n, self.kv_heads, self.head_dim)  # [N, kv_heads, head_dim] (strided view of qkv)
        o = attend(layer, q, k, v).reshape(n, self.q_size)  # [N, heads * head_dim]
        if m > n:
            o = F.pad(o, (0, 0, 0, m - n))  # [M, heads * head_dim]
        x = x + F.linear(o, self.o_proj, self.o_bias)
        gate, up = F.linear(self.post_attention_norm(x), self.gate_up_proj).chunk(2, dim=-1)  # [N, inter] each
        return x + F.linear(F.silu(gate) * up, self.down_proj)


def gemm_rows(n: int) -> int:
    """Rows the projections of an ``n``-token forward pass run on: ``n`` up to 32, else ``n`` rounded up to 1/8 of
    its power-of-two octave (<= 12.5 % padding; 8 shapes per octave, ~100 up to 8192 tokens).

    Why: on CPU, oneDNN builds a kernel ("primitive") for every new GEMM shape and caches it; a bf16 prefill whose
    token count the process has not seen before was measured 1.4x slower (median over 40 fresh lengths of 200-900
    tokens; 5 ms more at 20 tokens, 40 ms at 1000) than the same count again. Serving sees fresh prompt lengths all
    the time, calibration repeats its shapes; bucketing makes both run warm kernels."""
    if n <= 32:
        return n
    step = 1 << (n.bit_length() - 4)  # n in (2^k, 2^(k+1)]: step 2^(k-3)
    return -(-n // step) * step


class Llama(nn.Module):
    """Llama-architecture causal LM on packed tokens. Weights are frozen (inference only); fill them with `loader`.

    ``forward(input_ids [N], positions [N], attend, logits_index [B])`` returns fp32 logits ``[B, vocab]`` for the
    tokens at ``logits_index`` (usually the last token of each sequence; None = every token). On CPU the
    projections run on `gemm_rows` (N) rows, zero-padded (``pad_gemm_rows``; the padding never reaches attention,
    the KV cache or the logits).
    """

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.embed_tokens = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                                         requires_grad=False)  # [vocab, hidden]
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)  # [head_dim // 2] fp32
        self.pad_gemm_rows = self.device.type == "cpu"

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[N, 1, head_dim // 2]`` in the model dtype for positions ``[N]`` (computed in fp32)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, head_dim // 2]
        return freqs.cos().to(self.dtype)[:, None, :], freqs.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self.rope_cos_sin(positions)
        x = F.embedding(input_ids, self.embed_tokens)  # [N, hidden]
        n = x.shape[0]
        m = gemm_rows(n) if self.pad_gemm_rows else n
        if m > n:
            x = F.pad(x, (0, 0, 0, m - n))  # [M, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(i, x, cos, sin, attend)
        x = x[:n] if logits_index is None else x.index_select(0, logits_index)
        x = self.norm(x)  # [B, hidden]
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(x, head).float()  # [B, vocab]
