"""The model runner against transformers' LlamaForCausalLM on the same random tiny model, plus the paged KV cache,
KV shipping, loader errors and tokenizers."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file

from engine.model.kv_cache import BlockAllocator, KVPayload, OutOfBlocksError, kv_checksum
from engine.model.loader import create_random_model, load_model
from engine.model.runner import ModelRunner, SamplingParams, Sequence
from engine.model.tokenizer import ByteTokenizer, load_tokenizer
from sim.model_spec import PRESETS, from_hf_config

torch.set_num_threads(1)
PROMPTS = [list(b"Hello, world!"), list(b"The quick brown fox jumps over the lazy dog. " * 3), [256, 7], list(b"x")]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_last_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1]


def greedy(runner, seqs, steps):
    """Prefill then ``steps`` decode steps for a batch; returns generated tokens and per-step logits."""
    logits = [runner.prefill(seqs)]
    for _ in range(steps):
        for s, t in zip(seqs, runner.sample(logits[-1], seqs)):
            s.token_ids.append(t)
        logits.append(runner.decode(seqs))
    return logits


def test_logits_match_transformers_prefill_and_decode(model, hf_model):
    runner = ModelRunner(model, num_blocks=32, block_size=16)
    seq = Sequence(0, list(PROMPTS[1]))
    logits = greedy(runner, [seq], 6)
    n = len(PROMPTS[1])
    for step, lg in enumerate(logits):
        ref = hf_last_logits(hf_model, seq.token_ids[:n + step])
        torch.testing.assert_close(lg[0], ref, atol=2e-5, rtol=1e-4)


def test_greedy_tokens_match_transformers_generate(model, hf_model):
    runner = ModelRunner(model, num_blocks=64, block_size=8)
    seqs = [Sequence(i, list(p)) for i, p in enumerate(PROMPTS[:3])]
    greedy(runner, seqs, 20)  # samples 20 tokens (the last step's logits are not sampled)
    for p, s in zip(PROMPTS, seqs):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=258)
        assert s.token_ids[len(p):] == out[0, len(p):].tolist()


def test_batched_equals_one_at_a_time(model):
    single = []
    for i, p in enumerate(PROMPTS):
        runner = ModelRunner(model, num_blocks=64, block_size=4)
        single.append(torch.cat(greedy(runner, [Sequence(i, list(p))], 5)))
    runner = ModelRunner(model, num_blocks=128, block_size=4)
    seqs = [Sequence(i, list(p)) for i, p in enumerate(PROMPTS)]
    batched = greedy(runner, seqs, 5)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack([lg[i] for lg in batched]), single[i], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_full_prefill(model):
    prompt = PROMPTS[1]
    full = ModelRunner(model, num_blocks=32, block_size=16).prefill([Sequence(0, list(prompt))])
    runner = ModelRunner(model, num_blocks=32, block_size=16)
    seq = Sequence(0, list(prompt))
    runner.prefill([seq], [50])
    runner.prefill([seq], [30])
    last = runner.prefill([seq])
    assert seq.num_cached_tokens == len(prompt)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)


def test_kv_export_import_round_trip(model):
    src = ModelRunner(model, num_blocks=32, block_size=16)
    dst = ModelRunner(model, num_blocks=64, block_size=8)
    filler = Sequence(99, list(range(20)))
    dst.prefill([filler])  # so the imported sequence gets blocks that are not the first ones
    seq = Sequence(0, list(PROMPTS[1]))
    src.sample(src.prefill([seq]), [seq])
    payload = src.export_kv(seq)
    assert payload.data.shape == (4, 2, len(PROMPTS[1]), 2, 64)
    wire = payload.to_bytes()
    received = KVPayload.from_bytes(wire)
    assert received.checksum() == payload.checksum() == kv_checksum(payload.data)
    remote = Sequence(0, list(seq.token_ids) + [65])
    seq.token_ids.append(65)
    dst.import_kv(remote, received)
    assert remote.block_table[0] != 0 and remote.num_cached_tokens == len(PROMPTS[1])
    again = dst.export_kv(remote)
    assert torch.equal(again.data, payload.data) and again.checksum() == payload.checksum()
    torch.testing.assert_close(dst.decode([remote]), src.decode([seq]), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="bad magic"):
        KVPayload.from_bytes(b"nope" + wire[4:])
    with pytest.raises(ValueError, match="bytes"):
        KVPayload.from_bytes(wire[:-2])


def test_bf16_payload_bytes_round_trip():
    data = torch.randn(4, 2, 37, 2, 64).to(torch.bfloat16)
    back = KVPayload.from_bytes(KVPayload(data).to_bytes()).data
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), data.view(torch.int16))


def test_out_of_blocks_is_clear_and_allocates_nothing(model):
    runner = ModelRunner(model, num_blocks=4, block_size=4)
    seqs = [Sequence(0, list(range(10))), Sequence(1, list(range(10)))]  # 3 + 3 blocks > 4
    with pytest.raises(OutOfBlocksError, match="need 6, 4 free"):
        runner.prefill(seqs)
    assert runner.cache.allocator.num_free_blocks == 4 and all(s.block_table == [] for s in seqs)
    runner.prefill(seqs[:1])
    runner.free(seqs[0])
    assert runner.cache.allocator.num_free_blocks == 4
    alloc = BlockAllocator(2, 16)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(alloc.allocate(1) * 2)


def test_decode_requires_prefill(model):
    runner = ModelRunner(model, num_blocks=8, block_size=16)
    with pytest.raises(ValueError, match="prefill first"):
        runner.decode([Sequence(0, [1, 2, 3])])
    with pytest.raises(ValueError, match="token id"):
        runner.prefill([Sequence(0, [1, 300])])


def test_seeded_sampling_is_deterministic_and_batch_independent(model):
    runner = ModelRunner(model, num_blocks=64, block_size=16)

    def draw(seed, others=0):
        seqs = [Sequence(i, list(PROMPTS[0]), SamplingParams(1.0, seed if i == 0 else 7)) for i in range(others + 1)]
        greedy(runner, seqs, 10)
        out = seqs[0].token_ids[len(PROMPTS[0]):]
        for s in seqs:
            runner.free(s)
        return out

    assert draw(1) == draw(1) == draw(1, others=2)
    assert draw(1) != draw(2)


def test_bf16_close_to_fp32(tiny_model_dir, model):
    ref = ModelRunner(model, num_blocks=16, block_size=16).prefill([Sequence(0, list(PROMPTS[1]))])
    bf16 = ModelRunner.from_folder(tiny_model_dir, num_blocks=16, dtype="bf16")
    lg = bf16.prefill([Sequence(0, list(PROMPTS[1]))])
    assert bf16.cache.kv.dtype == torch.bfloat16
    assert (lg - ref).abs().max() < 0.05 * ref.abs().max()


def test_sharded_load_equals_single_file(tmp_path, model):
    folder = create_random_model(tmp_path / "sharded", PRESETS["tiny"], seed=0, max_shard_bytes=2_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = load_model(folder, dtype="fp32")
    for a, b in zip(model.state_dict().values(), sharded.state_dict().values()):
        assert torch.equal(a, b)


def test_random_model_config_round_trips_to_spec(tiny_model_dir):
    assert from_hf_config(tiny_model_dir, name="tiny") == PRESETS["tiny"]


def test_clear_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"broken: missing tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(broken)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight in model.safetensors has shape \(3, 3\)"):
        load_model(broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                    "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(broken)
    yarn = {"rope_type": "yarn", "factor": 4.0}
    (broken / "config.json").write_text(json.dumps({**cfg, "rope_scaling": yarn, "rope_parameters": None}))
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        load_model(broken)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = create_random_model(tmp_path / "l3", PRESETS["tiny"], seed=1)
    cfg = json.loads((folder / "config.json").read_text())
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg.update(rope_theta=500000.0, rope_scaling=rope, rope_parameters=rope)
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = list(b"rope scaling check " * 6)
    ours = ModelRunner(load_model(folder, dtype="fp32"), num_blocks=16).prefill([Sequence(0, ids)])
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(ours[0], hf_last_logits(hf, ids), atol=2e-5, rtol=1e-4)


def test_tokenizers(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert isinstance(tok, ByteTokenizer) and tok.encode("hé") == [104, 195, 169]
    assert tok.decode([256, *tok.encode("héllo"), 257]) == "héllo"
    tokenizers = pytest.importorskip("tokenizers")
    hf_tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, "[UNK]"))
    hf_tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3, "eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [1, 2] and tok.eos_id == 2 and tok.vocab_size == 3
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")
