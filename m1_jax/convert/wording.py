"""Counts in messages: ``count(1, "weight file")`` is "1 weight file", ``count(3, "weight file")`` "3 weight files"."""


def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
