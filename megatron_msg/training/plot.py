"""Loss curve with growth stages marked (the MSG paper's Figure 5 style)."""
from __future__ import annotations

from pathlib import Path


def plot_loss_curve(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Train (and validation) loss against step; a dashed line and the new shape at every growth."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    valid = [(r["step"], r["loss"]) for r in records if r.get("kind") == "valid"]
    growth = [r for r in records if r.get("kind") == "growth"]
    fig, ax = plt.subplots(figsize=(9, 5))
    if train:
        ax.plot(*zip(*train), lw=1.2, label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", ms=3, lw=1.2, label="validation loss")
    for g in growth:
        ax.axvline(g["step"], color="grey", ls="--", lw=0.8)
        how = " (auto)" if g.get("timing") == "auto" else ""
        ax.annotate(f"{g['operator']} -> {g['shape']}{how}", (g["step"], 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color="dimgrey")
    # at_step: auto: every check that decided to wait (its lookahead was rolled back), at its loss.
    waits = [(r["step"], r["loss_now"]) for r in records if r.get("kind") == "growth_check" and r["decision"] == "wait"]
    if waits:
        ax.plot(*zip(*waits), "x", ms=5, color="tab:red", label="auto timing: lookahead, waited")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss with growth stages")
    return save_figure(fig, ax, path)


def save_figure(fig, ax, path: str | Path) -> Path:
    """Legend, grid and layout, then write ``path`` atomically (temporary file, rename) and close."""
    import matplotlib.pyplot as plt
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
