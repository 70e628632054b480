"""The numbers `eggroll bench rl` compares methods by, from each seed's evaluation curve.

Methods spend env steps and seconds at different rates, so "final return" compares unequal
amounts of experience. Here every method of an environment is read at the same point:

    at_extent     each seed's eval return interpolated at x (env steps or training seconds);
                  x = the common extent, the smallest last x over every method and seed, so no
                  curve is extrapolated -> mean and standard error over seeds per method
    normalised    (R - R_start) / (R_best - R_start): R_start the mean over methods of the
                  first evaluation (the untrained policy), R_best the best method's mean at the
                  common extent; 1 = the best method, 0 = no better than the start
    verdict       EGGROLL against OpenES at equal env steps: "better" if its mean exceeds
                  OpenES's by more than one combined standard error sqrt(se_e^2 + se_o^2),
                  "worse" if it falls short by more, else "competitive" (the paper's three
                  classes); EGGROLL >= OpenES "within one standard error" = not "worse".
                  A gap under TIE_FRACTION of the larger |mean| is "competitive" whatever the
                  standard errors (two flat curves with seed-identical returns have stderr
                  ~1e-5, and a 0.3% gap would otherwise read as "better")

A curve is a dict of numpy arrays "steps", "wall" and "ret" (bench.rl.seed_curves).
"""

from __future__ import annotations

import math

import numpy as np

from ..tasks.rl import stderr


def common_extent(curves: dict[str, list[dict]], x: str) -> float:
    """The largest x every method's every seed reached (0 if some curve is empty)."""
    ends = [float(c[x][-1]) if len(c[x]) else 0.0 for cs in curves.values() for c in cs]
    return min(ends) if ends else 0.0


def at_extent(curves: list[dict], x: str, at: float) -> dict:
    """Mean and standard error over seeds of the eval return interpolated at x = at."""
    vals = np.array([float(np.interp(at, c[x], c["ret"])) for c in curves if len(c[x])])
    return {"at": at, "mean": float(vals.mean()) if len(vals) else float("nan"), "stderr": stderr(vals),
            "per_seed": [float(v) for v in vals]}


def start_return(curves: dict[str, list[dict]]) -> float:
    """The mean over methods (and seeds) of the first evaluation's return."""
    firsts = [float(c["ret"][0]) for cs in curves.values() for c in cs if len(c["ret"])]
    return float(np.mean(firsts)) if firsts else float("nan")


def normalised(points: dict[str, dict], start: float) -> dict[str, float]:
    """Each method's mean at the common extent on the scale start -> best method."""
    best = max(p["mean"] for p in points.values())
    span = best - start
    return {m: (1.0 if span <= 0 else (p["mean"] - start) / span) for m, p in points.items()}


TIE_FRACTION = 0.01


def verdict(eggroll: dict, open_es: dict) -> str:
    gap = eggroll["mean"] - open_es["mean"]
    se = max(math.hypot(eggroll["stderr"], open_es["stderr"]),
             TIE_FRACTION * max(abs(eggroll["mean"]), abs(open_es["mean"])))
    if gap > se:
        return "better"
    return "worse" if gap < -se else "competitive"


def compare(curves: dict[str, list[dict]]) -> dict:
    """Per x in (steps, wall): the common extent, each method's return there, normalised; and the
    EGGROLL-vs-OpenES verdict at equal env steps (when both ran)."""
    out: dict = {"start_return": start_return(curves)}
    for x in ("steps", "wall"):
        at = common_extent(curves, x)
        points = {m: at_extent(cs, x, at) for m, cs in curves.items()}
        out[x] = {"extent": at, "methods": points, "normalised": normalised(points, out["start_return"])}
    pts = out["steps"]["methods"]
    out["verdict"] = verdict(pts["eggroll"], pts["open_es"]) if {"eggroll", "open_es"} <= set(pts) else None
    return out
