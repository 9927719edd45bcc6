"""Numbers from eval's results.json: perplexity over position ranges, seed means and spreads, goal checks.

What is compared (DESIGN.md 3b, trap a: the first positions are context-starved for every model):
within L, positions [L/4, L); beyond L, positions [L, long); both in the same long windows. The
regression at L is the method's ppl@L over the control's (control-128: the same steps at L).
"""
from __future__ import annotations

import math

from benchmarks.study.corpus import HELDOUT_SETS
from benchmarks.study.recipe import BASE_L


def range_ppl(entry: dict, start: int, end: int) -> float | None:
    """Token-weighted perplexity over positions [start, end) from eval buckets (which must tile it)."""
    nll = tokens = 0.0
    for b in entry["buckets"]:
        if b["start"] >= start and b["end"] <= end and b["ppl"] is not None and b["tokens"]:
            nll += math.log(b["ppl"]) * b["tokens"]
            tokens += b["tokens"]
        elif b["start"] < end and b["end"] > start and not (b["start"] >= start and b["end"] <= end):
            raise ValueError(f"bucket [{b['start']}, {b['end']}) straddles [{start}, {end}): use --bucket-size "
                             f"dividing {start} and {end}")
    return math.exp(nll / tokens) if tokens else None


def model_numbers(model: dict, long_len: int, short: int = BASE_L, starved: int = BASE_L // 4) -> dict:
    """The numbers the study reports for one evaluated model (``None`` where a length is missing)."""
    ppl = model["perplexity"]
    out: dict = {"ppl_L": ppl.get(str(short), {}).get("ppl")}
    long = ppl.get(str(long_len))
    if long:
        out.update(ppl_long=long["ppl"], within=range_ppl(long, starved, short),
                   beyond=range_ppl(long, short, long_len), first=range_ppl(long, 0, starved))
        out["ratio"] = out["beyond"] / out["within"] if out["beyond"] and out["within"] else None
    return out


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half the range) of the values that are not None; the spread is None for one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return sum(values) / len(values), (max(values) - min(values)) / 2 if len(values) > 1 else None


def control_ppl(results: dict, runs: list[dict], kind: str) -> dict[int, float]:
    """ppl@L of the control (control-128: continued at L, base 10k) per seed, on one held-out set.

    The control lives in the 4x arm; the other arms share its base, steps and tokens, and evaluate
    ppl@L on the same windows, so their regression at L is measured against it too."""
    out = {}
    for r in runs:
        if r["method"] == "control-128":
            for m in results[f"{r['arm']}_{kind}"]["models"]:
                if m["name"] == f"control-128 s{r['seed']}":
                    out[r["seed"]] = m["perplexity"][str(BASE_L)]["ppl"]
    return out


def arm_numbers(res: dict, arm: dict, arm_runs: list[dict], control: dict[int, float]) -> dict:
    """{row name: {metric: (mean, spread over seeds)}} for the base, the training-free variants and
    each method (its seeds aggregated).

    ``regression``: mean ppl@L of the method over mean ppl@L of the control, minus 1; its spread is
    half the range over every (method seed, control seed) pair. Seeds are not paired: a seed is a
    data order, and the control reads another dataset (rows of 128), so seed i of both is no closer
    a match than any other pair."""
    by_name = {m["name"]: model_numbers(m, arm["seq_len"]) for m in res["models"]}
    method_models = {f"{r['method']} s{r['seed']}" for r in arm_runs}
    rows: dict[str, dict] = {n: {k: (v, None) for k, v in nums.items()}
                             for n, nums in by_name.items() if n not in method_models}
    for method in dict.fromkeys(r["method"] for r in arm_runs):
        mine = [r for r in arm_runs if r["method"] == method]
        seeds = [by_name[f"{method} s{r['seed']}"] for r in mine]
        rows[method] = {k: mean_spread([s.get(k) for s in seeds]) for k in {k for s in seeds for k in s}}
        rows[method]["seeds"] = len(seeds)
        ppl_l = [by_name[f"{method} s{r['seed']}"]["ppl_L"] for r in mine]
        if control:
            ratios = [p / c - 1 for p in ppl_l for c in control.values()]
            spread = (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else None
            rows[method]["regression"] = (mean_spread(ppl_l)[0] / mean_spread(list(control.values()))[0] - 1, spread)
    return rows


def goal_checks(rows: dict, arm_runs: list[dict], long_len: int) -> list[dict]:
    """The issue's goals, per method, on one held-out set (means over seeds). ``value`` is a ratio
    (``unit`` "x") or a relative change (``unit`` "%")."""
    checks = []
    for method in dict.fromkeys(r["method"] for r in arm_runs):
        if method == "control-128":
            continue
        ratio = rows[method]["ratio"][0]
        checks.append({"goal": f"ppl [{BASE_L},{long_len}) / ppl [{BASE_L // 4},{BASE_L}) <= 1", "method": method,
                       "value": ratio, "unit": "x", "met": ratio is not None and ratio <= 1.0})
        reg = rows[method].get("regression", (None, None))[0]
        checks.append({"goal": f"regression at {BASE_L} <= 2%", "method": method, "value": reg, "unit": "%",
                       "met": reg is not None and reg <= 0.02})
    abf = [m for m in rows if m.startswith("abf")]
    pi = [m for m in rows if m.startswith("pi-") and "(no training)" not in m]
    if abf and pi:
        a, p = rows[abf[0]]["ppl_long"][0], rows[pi[0]]["ppl_long"][0]
        checks.append({"goal": f"ABF ppl@{long_len} <= PI ppl@{long_len}", "method": f"{abf[0]} vs {pi[0]}",
                       "value": a / p - 1 if a and p else None, "unit": "%",
                       "met": a is not None and p is not None and a <= p})
    return checks


def dynamic_trap_check(results: dict, arm_name: str) -> dict:
    """Max relative difference of ppl@L between training-free dynamic NTK and the base (must be ~0:
    dynamic NTK changes nothing up to L, unless a stale enlarged base leaked from the longer length)."""
    diffs = {}
    for kind in HELDOUT_SETS:
        models = {m["name"]: m for m in results[f"{arm_name}_{kind}"]["models"]}
        dyn = [n for n in models if n.startswith("dynamic") and "(no training)" in n]
        if dyn and "base-128" in models:
            a = models[dyn[0]]["perplexity"][str(BASE_L)]["ppl"]
            b = models["base-128"]["perplexity"][str(BASE_L)]["ppl"]
            diffs[kind] = abs(a / b - 1)
    return diffs
