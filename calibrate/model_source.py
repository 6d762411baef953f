"""Which weights a calibration times: the built-in ``tiny`` model (random weights) or a Hugging Face folder.

Shape-only presets (``llama-3.1-8b`` ...) have no weights on this machine: calibrating them is refused with a pointer
to ``import-aic`` / ``roofline``, which build profiles for hardware and models you cannot run here.
"""

from __future__ import annotations

from pathlib import Path

from calibrate import CalibrationError
from sim.model_spec import PRESETS, ModelSpec, from_hf_config

RANDOM_PRESETS = ("tiny",)


def resolve_model(model: str, dtype: str, scratch: Path, seed: int = 0) -> tuple[Path, ModelSpec]:
    """``model`` -> (folder with config.json + safetensors, `ModelSpec` in the calibration ``dtype``).

    ``tiny`` is written with random weights (``seed``) under ``scratch``, which the caller owns and removes. Raises
    `CalibrationError` for a shape-only preset, a missing path, or a folder without config.json / weights.
    """
    key = str(model).lower()
    if key in RANDOM_PRESETS:
        from engine.model.loader import create_random_model

        spec = PRESETS[key]
        return create_random_model(scratch / key, spec, seed=seed), spec.with_dtype(dtype)
    if key in PRESETS:
        raise CalibrationError(f"model {model!r} is a shape-only preset without weights on this machine: pass a "
                               "Hugging Face folder (config.json + *.safetensors) to measure it, or build a profile "
                               "with `disagg calibrate import-aic` / `disagg calibrate roofline`")
    path = Path(model)
    if not path.exists():
        known = ", ".join(RANDOM_PRESETS)
        raise CalibrationError(f"model {model!r}: no such file or folder (expected {known} or a Hugging Face folder)")
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise CalibrationError(f"model {model!r}: {folder} has no config.json (not a Hugging Face model folder?)")
    if not any(folder.glob("*.safetensors")):
        raise CalibrationError(f"model {model!r}: {folder} has no *.safetensors weight files")
    try:
        spec = from_hf_config(folder, name=folder.name)
    except (FileNotFoundError, ValueError) as e:
        raise CalibrationError(f"model {model!r}: {e}") from e
    return folder, spec.with_dtype(dtype)
