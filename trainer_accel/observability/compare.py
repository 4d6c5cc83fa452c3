"""CLI: put runs side by side, from their event logs.

    python -m trainer_accel.compare RUN [RUN ...] --out compare.png

A RUN is an artifacts directory (its metrics/events.jsonl is read) or an events file. The picture has train and
val loss against step and against tokens seen, one colour per RUN and one line style per phase, and, when a run
tuned preferences, a third row of its pair accuracy (`rewards/accuracies`) and reward margin (`rewards/margins`),
train as lines and val as points, against step; the table has, per run id: phase, steps, tokens seen, best val
loss and its step, mean tokens/s and wall time.
The picture needs matplotlib (pip install -e '.[plot]'); without it the table is still printed (exit 2 only
when --out asked for the picture). Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.observability.metrics import read_events

LINE_STYLES = ("-", "--", "-.", ":")  # one per phase, in the order the phases first appear (pretrain, then SFT)
PAIR_METRICS = ("rewards/accuracies", "rewards/margins")  # a preference run's, by TRL's names


@dataclass
class RunSeries:
    label: str  # the RUN argument's name
    run_id: str
    phase: str
    train: list[dict]
    evals: list[dict]
    records: list[dict]

    def summary(self) -> dict:
        trained = [e for e in self.evals if e["step"] > 0 and e.get("val/loss") is not None] or [
            e for e in self.evals if e.get("val/loss") is not None
        ]
        best = min(trained, key=lambda e: e["val/loss"], default=None)
        speeds = [r["train/tokens_per_sec"] for r in self.train if r.get("train/tokens_per_sec")]
        times = [r["time"] for r in self.records]
        return {
            "run": self.label,
            "run_id": self.run_id,
            "phase": self.phase,
            "steps": max((r["step"] for r in self.train), default=0),
            "tokens": max((r.get("train/tokens_seen") or 0 for r in self.train), default=0),
            "best_val_loss": None if best is None else best["val/loss"],
            "best_step": None if best is None else best["step"],
            "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
            "wall_s": max(times) - min(times) if times else 0.0,
        }


def events_file(run: Path) -> Path:
    return run / "metrics" / "events.jsonl" if run.is_dir() else run


def load_runs(runs: list[Path]) -> list[RunSeries]:
    problems, series = [], []
    for run in runs:
        path = events_file(run)
        if not path.is_file():
            problems.append(f"{run}: no event log (expected an artifacts dir with metrics/events.jsonl, or the file)")
            continue
        try:
            records = read_events(path)
        except (ValueError, OSError) as e:
            problems.append(f"{path}: not a readable event log ({e})")
            continue
        by_run: dict[tuple[str, str], list[dict]] = {}
        for r in records:
            by_run.setdefault((r.get("run_id"), r.get("phase")), []).append(r)
        found = [(k, v) for k, v in by_run.items() if any(r["event"] == "train" for r in v)]
        if not found:
            problems.append(f"{path}: holds no training records")
        label = run.resolve().name if run.is_dir() else path.resolve().parent.parent.name or path.stem
        for (run_id, phase), recs in found:
            series.append(
                RunSeries(
                    label,
                    run_id,
                    phase,
                    [r for r in recs if r["event"] == "train"],
                    [r for r in recs if r["event"] == "eval"],
                    recs,
                )
            )
    raise_if_any(problems)
    return series


def plot(series: list[RunSeries], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--out: drawing needs matplotlib (pip install -e '.[plot]')") from None
    pairs = any(f"train/{PAIR_METRICS[0]}" in r for s in series for r in s.train)
    fig, axes = plt.subplots(3 if pairs else 2, 2, figsize=(12, 12 if pairs else 8))
    for row in (0, 1):  # a loss against steps and against tokens: one scale; the pair metrics keep their own
        axes[row, 1].sharey(axes[row, 0])
    labels = list(dict.fromkeys(s.label for s in series))
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    phases = list(dict.fromkeys(s.phase for s in series))
    styles = {p: LINE_STYLES[i % len(LINE_STYLES)] for i, p in enumerate(phases)}
    for s in series:
        style = dict(color=colours[s.label], linestyle=styles[s.phase], label=f"{s.label} {s.phase}")
        tokens_at = {r["step"]: r.get("train/tokens_seen") or 0 for r in s.train}
        evals = [e for e in s.evals if e.get("val/loss") is not None]
        for col, x_of in ((0, lambda r: r["step"]), (1, lambda r: tokens_at.get(r["step"], 0))):
            axes[0, col].plot([x_of(r) for r in s.train], [r["train/loss"] for r in s.train], **style)
            axes[1, col].plot(
                [x_of(e) for e in evals], [e["val/loss"] for e in evals], marker="o", markersize=3, **style
            )
        for col, metric in enumerate(PAIR_METRICS if pairs else ()):
            trained = [r for r in s.train if f"train/{metric}" in r]
            axes[2, col].plot([r["step"] for r in trained], [r[f"train/{metric}"] for r in trained], **style)
            measured = [e for e in s.evals if f"val/{metric}" in e]
            axes[2, col].plot(
                [e["step"] for e in measured], [e[f"val/{metric}"] for e in measured], marker="o", markersize=3,
                linestyle="none", color=style["color"],
            )  # fmt: skip
    for row, name in enumerate(("train loss", "val loss")):
        for col, xlabel in enumerate(("step", "tokens seen")):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    for col, metric in enumerate(PAIR_METRICS if pairs else ()):
        axes[2, col].set_xlabel("step")
        axes[2, col].set_ylabel(f"{metric} (train lines, val points)")
        axes[2, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def format_table(series: list[RunSeries]) -> str:
    head = (
        f"{'run':<16} {'run_id':<12} {'phase':<10} {'steps':>7} {'tokens':>12} {'best val':>9} {'at step':>7} "
        f"{'tok/s':>9} {'wall s':>8}"
    )
    lines = [head, "-" * len(head)]
    for s in series:
        m = s.summary()
        best = "-" if m["best_val_loss"] is None else f"{m['best_val_loss']:.4f}"
        tps = "-" if m["tokens_per_sec"] is None else f"{m['tokens_per_sec']:,.0f}"
        lines.append(
            f"{m['run'][:16]:<16} {str(m['run_id'])[:12]:<12} {m['phase']:<10} {m['steps']:>7} {m['tokens']:>12,} "
            f"{best:>9} {str(m['best_step'] if m['best_step'] is not None else '-'):>7} {tps:>9} {m['wall_s']:>8.1f}"
        )
    return "\n".join(lines)
