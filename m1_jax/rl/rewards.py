"""Verifiable rewards: exact match after normalisation, a math-answer checker, user reward functions.

* ``exact``: 1.0 when the normalised response equals the normalised answer, else 0.0
  (:func:`normalize`: surrounding whitespace and a final period dropped, inner whitespace collapsed,
  lower case). The rollout passes the response without its stop token.
* ``math``: the response's final answer (the last ``\\boxed{...}``, else the last number) equals the
  reference as a number (``0.5`` = ``1/2`` = ``.50``; ``1,234`` = ``1234``), or as normalised text when
  either is not a number. A response with no answer scores 0.0.
* a user function ``(prompt: str, response: str) -> float``, named ``"package.module:function"``.

The built-in checkers never raise: malformed responses score 0.0. A user function that raises, or
returns something that is not a finite number, is never scored silently: by default the run stops with
a :class:`RewardError` naming the prompt and the response (``RLConfig.reward_errors = 'raise'``); with
``'score'`` the sample gets ``RLConfig.reward_error_value``, and every such sample is counted
(``reward/errors``) and the first ones are printed with their prompt, response and error.
"""

from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Callable, Sequence

from m1_jax.config import ConfigError

RewardFn = Callable[[str, str], float]


class RewardError(RuntimeError):
    """A reward function raised or returned a value that is not a finite number."""


def normalize(text: str) -> str:
    text = " ".join(text.strip().split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(response: str, answer: str) -> float:
    return float(normalize(response) == normalize(answer))


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed); ``None`` if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text) if any(c.isdigit() for c in m.group(0))]


_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")


def _plain(text: str) -> str:
    """Light LaTeX clean-up of an answer: ``\\frac{a}{b}`` -> ``(a)/(b)``, ``\\text{x}`` -> ``x``, no ``\\left``,
    ``\\right``, ``\\!``, ``\\,`` or ``^\\circ``."""
    text = _TEXT.sub(r"\1", text)
    text = _FRAC.sub(r"\1/\2", text)
    for token in ("\\left", "\\right", "\\!", "\\,", "^\\circ", "^{\\circ}", "\\%"):
        text = text.replace(token, "")
    return text


def as_number(text: str) -> Fraction | None:
    """``'1,234'``, ``'-0.50'``, ``'3/4'``, ``'\\frac{3}{4}'``, ``'$12'``, ``'12.'`` as an exact number; ``None``
    when not a number."""
    t = _plain(text).strip().strip("$").rstrip(".").replace(",", "").replace(" ", "")
    t = t[:-1] if t.endswith("%") else t
    if not t:
        return None
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return Fraction(Fraction(num), Fraction(den)) if Fraction(den) != 0 else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(response: str) -> str | None:
    """The last ``\\boxed{...}``, else the last number of ``response``; ``None`` if neither exists."""
    boxed = _boxed(response)
    if boxed is not None:
        return boxed.strip()
    nums = _numbers(response)
    return nums[-1] if nums else None


def math_match(response: str, answer: str) -> float:
    got = final_answer(response)
    if got is None:
        return 0.0
    a, b = as_number(got), as_number(answer)
    if a is not None and b is not None:
        return float(a == b)
    return float(normalize(_plain(got)) == normalize(_plain(answer)))


BUILTIN = {"exact": exact_match, "math": math_match}


def load_user_reward(spec: str) -> RewardFn:
    """``"package.module:function"`` -> the function (checked to be callable)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"RLConfig.reward = {spec!r} is invalid: expected 'auto', 'exact', 'math' or "
                          "'package.module:function' (a function (prompt, response) -> float)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"RLConfig.reward = {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"RLConfig.reward = {spec!r}: {type(fn).__name__} is not callable")
    return fn


class Scorer:
    """Scores responses with one reward; counts (and reports) the samples whose reward failed."""

    def __init__(self, spec: str, *, default: str, on_error: str = "raise", error_value: float = 0.0,
                 report: Callable[[str], None] = print, max_reports: int = 5):
        if on_error not in ("raise", "score"):
            raise ConfigError(f"RLConfig.reward_errors = {on_error!r} is invalid: expected 'raise' or 'score'")
        name = default if spec == "auto" else spec
        if name in BUILTIN:
            check = BUILTIN[name]
            self.fn: Callable[[str, str, str], float] = lambda prompt, response, answer: check(response, answer)
            self.user = False
        else:
            user = load_user_reward(name)
            self.fn = lambda prompt, response, answer: user(prompt, response)
            self.user = True
        self.name = name
        self.on_error, self.error_value = on_error, float(error_value)
        self.report, self.max_reports = report, max_reports
        self.errors = 0

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], int]:
        """Rewards of each ``(prompt, response)``; and how many of them failed in this call."""
        out, failed = [], 0
        for prompt, response, answer in zip(prompts, responses, answers, strict=True):
            try:
                value = self.fn(prompt, response, answer)
                problem = None if _finite(value) else f"returned {value!r}, not a finite number"
            except Exception as e:  # the user's code: any exception is reported with the sample
                problem = f"raised {type(e).__name__}: {e}"
            if problem is None:
                out.append(float(value))
                continue
            msg = f"reward {self.name!r} {problem} on prompt {prompt!r}, response {response!r}"
            if self.on_error == "raise":
                raise RewardError(msg + " (RLConfig.reward_errors = 'score' scores such samples "
                                  "RLConfig.reward_error_value instead, counting them)")
            self.errors += 1
            failed += 1
            if self.errors <= self.max_reports:
                self.report(f"{msg}: scored {self.error_value}" + (
                    " (further errors are only counted: reward/errors)" if self.errors == self.max_reports else ""))
            out.append(self.error_value)
        return out, failed


def _finite(value) -> bool:
    """A real number (int, float, bool, NumPy scalar) that is finite; strings never count."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
