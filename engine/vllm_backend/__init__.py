"""vLLM as a disagg backend: vLLM OpenAI servers (from the separate ``.venv-vllm``) behind disagg's router.

`cluster.VllmCluster` launches them for a topology (colocated ``NC`` or NIXL prefill/decode ``NPMD``);
`proxy` is the router (same API and record schema as `engine.server`); `model_folder` gives disagg's presets the
tokenizer vLLM insists on. Nothing here imports vllm: the main environment only starts its processes.
"""
