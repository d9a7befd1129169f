"""Paper-style figures regenerated from saved run records (never recomputed in the figure code)."""

from pathlib import Path


def read_results(path, what: str, producer: str):
    """The JSON document at `path`; a one-line ConfigError naming the file when it is absent (and what writes it) or
    not valid JSON."""
    import json
    from ..config import ConfigError
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} do not exist ({producer} writes them)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} are not valid JSON: {e}") from None


def save_figure(fig, out, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `out` (its folder made), close it, return the path."""
    import matplotlib.pyplot as plt
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
