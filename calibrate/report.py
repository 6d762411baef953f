"""Reading profiles back: fit-quality rows (`show`), roofline profiles (`roofline`), side-by-side predictions.

Rows are plain dicts (the CLI renders them with rich); errors are fractions, times seconds, rates per second.
"""

from __future__ import annotations

from pathlib import Path

from calibrate import CalibrationError
from sim.cost_profile import CostProfile, roofline_profile
from sim.hardware import get_hardware
from sim.model_spec import ModelSpec, get_model

# (label, kind, batch, tokens each): prompt tokens for prefill, context for decode.
COMPARE_SHAPES = [("prefill 1 x 512", "prefill", 1, 512), ("prefill 1 x 4096", "prefill", 1, 4096),
                  ("prefill 8 x 1024", "prefill", 8, 1024), ("decode 1 @ 1024", "decode", 1, 1024),
                  ("decode 32 @ 2048", "decode", 32, 2048), ("decode 128 @ 4096", "decode", 128, 4096)]


def load_profile(path: str | Path) -> CostProfile:
    """`CostProfile.load` with user-facing errors: raises `CalibrationError` naming the file."""
    try:
        return CostProfile.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise CalibrationError(str(e)) from e


def show(path: str | Path | CostProfile) -> list[dict]:
    """Fit-quality rows of a profile (file or object): one per phase, then one per measured transport.

    Each row: ``what``, ``formula`` (coefficients), ``points`` ("fit/held-out"), ``heldout_mape``, ``heldout_max_err``,
    ``cv_mape``, ``spread``, ``note``. Missing figures (e.g. a roofline profile has no fit) are None.
    """
    prof = path if isinstance(path, CostProfile) else load_profile(path)
    fit = prof.fit or {}
    p = prof.prefill
    pre = (f"{_ms(p.a_s)} + {p.b_s * 1e6:.3g} us*sum(len) + {p.c_s * 1e9:.3g} ns*sum(len^2)"
           + (f" + {_ms(p.d_s)}*seqs" if p.d_s else "") + (f" + {p.e_s * 1e9:.3g} ns*sum(len)^2" if p.e_s else ""))
    rows = [_row("prefill", pre, fit.get("prefill", {}))]
    pieces = []
    for piece in prof.decode:
        upto = "any batch" if piece.max_batch >= 1 << 29 else f"batch <= {piece.max_batch}"
        pieces.append(f"{upto}: {_ms(piece.a_s)} + {piece.b_s * 1e6:.3g} us*batch + {piece.c_s * 1e9:.3g} ns*sum(ctx)")
    rows.append(_row("decode", "; ".join(pieces), fit.get("decode", {})))
    links = fit.get("links", {})
    for kind, link in prof.links.items():
        info = links.get(kind, {})
        vs = info.get("vs_copy")
        rows.append({"what": f"transfer {kind}", "formula": f"{link.latency_s * 1e6:.3g} us + bytes / "
                     f"{link.bandwidth_bytes_per_s / 1e9:.3g} GB/s", "points": str(len(info["sizes"])) if info.get("sizes") else "",
                     "heldout_mape": None, "heldout_max_err": None, "cv_mape": info.get("mape"), "spread": None,
                     "note": f"{vs:.2f} x copy ceiling" if vs else ""})
    for kind, info in links.items():
        if isinstance(info, dict) and "error" in info:
            rows.append({"what": f"transfer {kind}", "formula": "failed", "points": "", "heldout_mape": None,
                         "heldout_max_err": None, "cv_mape": None, "spread": None, "note": info["error"]})
    return rows


def _row(what: str, formula: str, info: dict) -> dict:
    pts = f"{info['fit_points']}/{info['heldout_points']}" if "fit_points" in info else ""
    note = []
    if "rounds" in info:
        note.append(f"{info['rounds']} rounds, {info['samples']} samples, {info['rejected']} rejected")
    if "pieces" in info:
        note.append(f"{info['pieces']} piece(s)")
    return {"what": what, "formula": formula, "points": pts, "heldout_mape": info.get("heldout_mape"),
            "heldout_max_err": info.get("heldout_max_err"), "cv_mape": info.get("cv_mape"),
            "spread": info.get("median_spread"), "note": "; ".join(note)}


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def roofline(model: str | ModelSpec, hardware: str, tp: int = 1) -> CostProfile:
    """A datasheet roofline profile for ``model`` (preset, HF folder or spec) on ``tp`` x ``hardware`` (a sim preset).

    Raises `CalibrationError` for an unknown model or hardware or a bad tp.
    """
    try:
        spec = model if isinstance(model, ModelSpec) else get_model(model)
        return roofline_profile(spec, get_hardware(hardware), tp)
    except ValueError as e:
        raise CalibrationError(str(e)) from e


def compare(profiles: dict[str, CostProfile], shapes: list[tuple[str, str, int, int]] = COMPARE_SHAPES) -> list[dict]:
    """Predicted step time (seconds) of each profile for each shape: rows ``{"shape": label, name: seconds, ...}``."""
    rows = []
    for label, kind, batch, tokens in shapes:
        row: dict = {"shape": label}
        for name, prof in profiles.items():
            row[name] = (prof.prefill_s([tokens] * batch) if kind == "prefill"
                         else prof.decode_step_s(batch, batch * tokens))
        rows.append(row)
    return rows
