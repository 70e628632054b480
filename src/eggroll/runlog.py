"""Run logging shared by all recipes: a run directory with metrics, a progress bar and a curve.

    log = RunLog("runs/cartpole", total=300, plot_keys=["fitness_mean", "eval_return"])
    for step in range(1, 301):
        ...
        log.log(step, {"fitness_mean": f, "loss": l})     # one JSON line, progress bar update
    log.close()                                            # final PNG curve

Files written in the run directory:

    metrics.jsonl   one JSON object per step: {"<x>": step, "wall_s": ..., **metrics}, appended
                    and flushed line by line (strict JSON: non-finite numbers become null).
    curve.png       learning curve(s): for every plotted metric (group) one row with two panels,
                    y against the step and y against wall-clock seconds (matplotlib, Agg).
    <name>.json     anything passed to `write_json` (config, final result...), written atomically.

Resuming: `RunLog(..., resume_from=step)` keeps the records of metrics.jsonl up to and including
`step` (the checkpointed step) and drops the rest (steps logged after the last checkpoint, and a
line torn by a crash), so a resumed run never duplicates steps; the wall clock continues from the
last kept record (or `wall_offset`). Without `resume_from` the file is started afresh.

The progress bar (tqdm) goes to stderr; by default it is shown only when stderr is a terminal
(`progress=True/False` forces it on/off). `print` writes messages without breaking the bar.
Values may be Python, NumPy or JAX scalars or small arrays; nothing here depends on JAX.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

__all__ = ["RunLog", "read_metrics", "plot_curves", "write_json"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curve.png"


def _to_json(value: Any) -> Any:
    """Python/NumPy/JAX value -> strict-JSON value (non-finite floats -> None)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / jax arrays
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    try:
        return _to_json(float(value))
    except (TypeError, ValueError):
        return str(value)


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_to_json(obj), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn or invalid line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    if not path.exists():
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _groups(keys) -> list[tuple[str, ...]]:
    if isinstance(keys, str):
        return [(keys,)]
    return [(k,) if isinstance(k, str) else tuple(k) for k in keys]


def plot_curves(records: Sequence[Mapping], path, keys, *, x: str = "generation",
                title: str | None = None) -> Path | None:
    """PNG with one row per key group: metric vs `x` (left) and vs wall-clock seconds (right).

    keys: metric names, or groups (tuples) of names sharing one row. Records without a metric,
    or with a null value, are skipped for that metric. Returns None if nothing can be plotted."""
    groups = [g for g in _groups(keys) if any(_has(r, k) for r in records for k in g)]
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        for col, xkey in enumerate((x, "wall_s")):
            ax = axes[row][col]
            for k in group:
                pts = [(r[xkey], r[k]) for r in records if _has(r, k) and _has(r, xkey)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                sparse = len(pts) < 0.5 * len(records)  # e.g. a periodic evaluation
                ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, label=k)
            ax.set_xlabel("wall-clock (s)" if xkey == "wall_s" else xkey)
            ax.set_ylabel(group[0] if len(group) == 1 else "value")
            ax.grid(alpha=0.3)
            if len(group) > 1:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _terminal_fallback() -> dict:
    """tqdm size arguments for a terminal that reports 0 x 0 (tqdm would draw nothing there)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {"dynamic_ncols": True}
    out = {"dynamic_ncols": size.columns > 0}
    if size.columns <= 0:
        out["ncols"] = 100
    if size.lines <= 0:
        out["nrows"] = 24
    return out


def _has(rec: Mapping, key: str) -> bool:
    v = rec.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RunLog:
    """Metrics JSONL + progress bar + learning-curve PNG for one run directory.

    run_dir: created if missing. total: steps in the budget (progress bar length).
    x: name of the step field (default "generation"). plot_keys: metrics (or groups of metrics)
    drawn by `plot`; default: every numeric metric logged. postfix_keys: metrics shown on the
    progress bar (default: the plot keys). resume_from: keep records up to this step and continue
    (see module docstring). wall_offset: wall-clock seconds already spent (default: from the
    last kept record on resume, else 0). progress: None = bar only if stderr is a terminal.
    start_time: time.perf_counter() value at which this session's clock starts (default now),
    e.g. taken before set-up and compilation so that they count. write=False: keep the clock and
    the records but touch no file and show nothing (processes other than 0 of a multi-process run;
    the wall clock of a resumed run then comes from `wall_offset`)."""

    def __init__(self, run_dir, *, total: int | None = None, x: str = "generation",
                 plot_keys: Iterable | None = None, postfix_keys: Iterable[str] | None = None,
                 resume_from: int | None = None, wall_offset: float | None = None,
                 progress: bool | None = None, desc: str | None = None, title: str | None = None,
                 start_time: float | None = None, write: bool = True):
        self.run_dir = Path(run_dir)
        self.write = write
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plot_path = self.run_dir / PLOT_FILE
        self.x = x
        self.title = title
        self.plot_keys = None if plot_keys is None else _groups(list(plot_keys))
        if postfix_keys is not None:
            self.postfix_keys = list(postfix_keys)
        else:
            self.postfix_keys = [k for g in (self.plot_keys or []) for k in g]
        self.records: list[dict] = []
        start = 0
        if resume_from is not None and write:
            kept = [r for r in read_metrics(self.metrics_path)
                    if isinstance(r.get(x), (int, float)) and r[x] <= resume_from]
            self.records = kept
            if wall_offset is None:
                walls = [r["wall_s"] for r in kept if _has(r, "wall_s")]
                wall_offset = walls[-1] if walls else 0.0
        if resume_from is not None:
            start = int(resume_from)
        self._file = None
        if write:
            self._rewrite()  # truncates on a fresh run, drops the post-checkpoint tail on resume
            self._file = open(self.metrics_path, "a")
        self.wall_offset = float(wall_offset or 0.0)
        self._t0 = time.perf_counter() if start_time is None else float(start_time)
        self.step = start
        self._last_postfix: dict = {}
        self.bar = tqdm(total=total, initial=start, desc=desc, unit=x[:3] if x else "it",
                        file=sys.stderr, mininterval=0.5, disable=True if not write else None if progress is None else not progress,
                        **_terminal_fallback())

    # -- time ---------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of this run, including time before a resume."""
        return self.wall_offset + (time.perf_counter() - self._t0)

    @property
    def session_elapsed(self) -> float:
        """Wall-clock seconds since this RunLog was created."""
        return time.perf_counter() - self._t0

    # -- logging ------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **more) -> dict:
        """Append one record {x: step, "wall_s": elapsed, **metrics} and advance the bar."""
        rec = {self.x: int(step), "wall_s": round(self.elapsed, 4)}
        for k, v in {**(metrics or {}), **more}.items():
            rec[str(k)] = _to_json(v)
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        self.records.append(rec)
        self.bar.update(max(0, int(step) - self.step))
        self.step = int(step)
        post = {k: rec[k] for k in self.postfix_keys if _has(rec, k)}
        if post:
            self._last_postfix.update(post)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self._last_postfix.items()}, refresh=False)
        return rec

    def print(self, *args) -> None:
        """A message on stderr that does not break the progress bar."""
        if self.write:
            tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)

    def write_json(self, name: str, obj) -> Path | None:
        """run_dir/name (".json" added if missing), atomically; None when not writing."""
        if not self.write:
            return None
        return write_json(self.run_dir / (name if name.endswith(".json") else name + ".json"), obj)

    def plot(self, keys: Iterable | None = None, path=None) -> Path | None:
        """Write the learning curve PNG (default run_dir/curve.png); None if nothing to plot."""
        if not self.write:
            return None
        if keys is None:
            keys = self.plot_keys
        if keys is None:
            skip = {self.x, "wall_s"}
            keys = sorted({k for r in self.records for k in r if k not in skip and _has(r, k)})
        return plot_curves(self.records, path or self.plot_path, keys, x=self.x, title=self.title)

    def close(self, plot: bool = True) -> None:
        if plot:
            self.plot()
        self.bar.close()
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(plot=exc[0] is None)
        return False

    def _rewrite(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", dir=self.run_dir)
        with os.fdopen(fd, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.metrics_path)
