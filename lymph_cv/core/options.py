"""Option values shared by several commands, parsed once."""
from __future__ import annotations

from typing import Dict, Iterable, List

from lymph_cv.errors import ConfigError


def parse_pairs(pairs: Iterable[str], option: str = "--set") -> Dict[str, str]:
    """``["key=value", ...]`` → dict (keys and values stripped; a later key wins); ConfigError naming
    ``option`` (none: the caller names it) on a pair without ``=`` or without a key."""
    parsed: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{option} {pair!r}: expected key=value" if option else f"{pair!r}: expected key=value")
        parsed[key] = value.strip()
    return parsed


def parse_fold_spec(spec: str) -> List[int]:
    """``"1-5"``, ``"1,3"``, ``"2"`` or mixes like ``"1-2,4"`` → sorted fold numbers."""
    folds = set()
    for part in spec.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            if dash:
                a, b = int(low), int(high)
                if a > b:
                    raise ValueError
                folds.update(range(a, b + 1))
            else:
                folds.add(int(part))
        except ValueError:
            raise ConfigError(f"--folds {spec!r}: expected fold numbers like 1-5 or 1,3") from None
    if not folds or min(folds) < 1:
        raise ConfigError(f"--folds {spec!r}: fold numbers start at 1")
    return sorted(folds)
