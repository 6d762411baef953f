"""Load Hugging Face Llama folders (``config.json`` + safetensors, single or sharded) into `Llama`, and write random
ones (`create_random_model`) that both this loader and transformers' ``LlamaForCausalLM`` can read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.llama import Llama, LlamaConfig
from sim.jsonfile import read_json
from sim.model_spec import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp32"``/``"float32"``/``"fp16"``/``"float16"`` or a torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def read_config(folder: str | Path) -> LlamaConfig:
    """Parse ``folder/config.json``. Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the problem."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder?)")
    return LlamaConfig.from_hf(read_json(path, obj=True), str(path))


def hf_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for a Llama model, in checkpoint order."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, h)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index if there is one, else from the files' headers."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        files = {name: folder / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which is missing from {folder}")
        return files
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
    files = {}
    for f in paths:
        with safe_open(f, framework="pt") as st:
            files.update({name: f for name in st.keys()})
    return files


def _targets(model: Llama) -> dict[str, torch.Tensor]:
    """Hugging Face tensor name -> the (slice of the) parameter it fills; q/k/v and gate/up land in fused rows."""
    cfg = model.cfg
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_norm.weight
        for kind, fused in (("weight", layer.qkv_proj), ("bias", layer.qkv_bias)):
            if fused is not None:
                out[p + f"self_attn.q_proj.{kind}"] = fused[:q]
                out[p + f"self_attn.k_proj.{kind}"] = fused[q:q + kv]
                out[p + f"self_attn.v_proj.{kind}"] = fused[q + kv:]
        out[p + "self_attn.o_proj.weight"] = layer.o_proj
        if layer.o_bias is not None:
            out[p + "self_attn.o_proj.bias"] = layer.o_bias
        out[p + "mlp.gate_proj.weight"] = layer.gate_up_proj[:inter]
        out[p + "mlp.up_proj.weight"] = layer.gate_up_proj[inter:]
        out[p + "mlp.down_proj.weight"] = layer.down_proj
    return out


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bf16") -> Llama:
    """Build a `Llama` from a Hugging Face folder, weights converted to ``dtype`` on ``device``.

    Raises ``FileNotFoundError`` (no config.json, no weights, missing shard) or ``ValueError`` (unsupported
    architecture, missing tensor, shape mismatch), each naming the folder.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    dt, dev = resolve_dtype(dtype), torch.device(device)
    files = _weight_files(folder)
    shapes = hf_weight_shapes(cfg)
    missing = [n for n in shapes if n not in files]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{folder}: missing tensor {', '.join(missing[:3])}{more}")
    extra = sorted(set(files) - set(shapes) - {"lm_head.weight"})
    if extra:
        log.warning("%s: ignoring %d unused tensors, e.g. %s", folder, len(extra), extra[0])

    model = Llama(cfg, dtype=dt, device=dev)
    targets = _targets(model)
    assert set(targets) == set(shapes), set(targets) ^ set(shapes)
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as st:
            for name in names:
                t = st.get_tensor(name)
                if tuple(t.shape) != shapes[name]:
                    raise ValueError(f"{folder}: tensor {name} in {f.name} has shape {tuple(t.shape)}, "
                                     f"config.json implies {shapes[name]}")
                targets[name].copy_(t)  # converts dtype and device, one tensor at a time
    log.info("loaded %s: %d layers, %s on %s", folder, cfg.num_layers, dt, dev)
    return model.eval()


def create_random_model(path: str | Path, spec: ModelSpec, seed: int = 0,
                        max_shard_bytes: int | None = None) -> Path:
    """Write a Llama folder with ``spec``'s shapes and random weights: ``config.json`` and ``model.safetensors``
    (or shards plus ``model.safetensors.index.json`` when ``max_shard_bytes`` is given).

    Linear and embedding weights are N(0, 0.02²), norm weights 1 + N(0, 0.1²), all drawn in fp32 from ``seed`` and
    stored in the spec's dtype (bf16 for ``dtype_bytes`` 2, fp32 for 4): same spec and seed give identical files.
    Byte-vocabulary models (vocab 259) get bos/eos/pad ids 256/257/258. Returns the folder. Creates it if needed.
    """
    dtypes = {2: (torch.bfloat16, "bfloat16"), 4: (torch.float32, "float32")}
    if spec.dtype_bytes not in dtypes:
        raise ValueError(f"create_random_model: spec {spec.name!r} has dtype_bytes {spec.dtype_bytes}; "
                         "expected 2 (bf16) or 4 (fp32)")
    dt, dt_name = dtypes[spec.dtype_bytes]
    cfg = LlamaConfig.from_spec(spec)
    hf = {**cfg.to_hf(), "torch_dtype": dt_name, "dtype": dt_name, "_name_or_path": spec.name}
    if spec.vocab_size == 259:
        hf.update(bos_token_id=256, eos_token_id=257, pad_token_id=258)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in hf_weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        t = t.to(dt)
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(shards[0], folder / "model.safetensors", metadata=meta)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / fname, metadata=meta)
            weight_map.update({n: fname for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    log.info("wrote random %s model (seed %d) to %s", spec.name, seed, folder)
    return folder
