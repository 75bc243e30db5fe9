"""Number formatting shared by the report writers and the CLI: fractions shown as percent or points, "—" for None."""

from __future__ import annotations

DASH = "—"


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as percent: 0.7612 -> "76.12"."""
    return DASH if x is None else f"{100 * x:.{digits}f}"


def pts(x: float | None, digits: int = 2, sign: bool = True) -> str:
    """A difference of fractions in points, signed by default: -0.004 -> "-0.40"."""
    return DASH if x is None else f"{100 * x:{'+' if sign else ''}.{digits}f}"


def ci(interval, signed: bool = False) -> str:
    """A 95% CI of a fraction in percent ("[75.3, 76.9]"), or of a difference in signed points ("[-0.81, +0.12]")."""
    if interval is None:
        return DASH
    f = "+.2f" if signed else ".1f"
    return f"[{100 * interval[0]:{f}}, {100 * interval[1]:{f}}]"


def num(x: float | None, fmt: str = ".1f") -> str:
    return DASH if x is None else format(x, fmt)


def p_value(p: float | None) -> str:
    return DASH if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")
