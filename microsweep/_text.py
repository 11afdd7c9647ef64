"""Number and time formatting shared by the progress lines, `status` and `show`."""

from __future__ import annotations

__all__ = ["clock", "digits_apart", "distinct"]


def digits_apart(value: float, ref: float, digits: int = 4) -> int:
    """The significant digits, at least `digits` and at most 10, that print `value` and `ref`
    differently (a perplexity over its ceiling by 2e-5 must not print as equal to it); equal
    numbers need no more than `digits`."""
    n = digits
    while n < 10 and value != ref and f"{value:.{n}g}" == f"{ref:.{n}g}":
        n += 1
    return n


def distinct(value: float, ref: float, digits: int = 4) -> tuple[str, str]:
    """`value` and `ref` printed with the same `digits_apart` significant digits (where more
    than `digits` are needed, both show all of them, trailing zeros included)."""
    n = digits_apart(value, ref, digits)
    form = f"#.{n}g" if n > digits else f".{n}g"  # extra digits kept, trailing zeros too
    return format(value, form), format(ref, form)


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on (never negative)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
