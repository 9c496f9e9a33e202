"""Rewards on hand-made cases, malformed answers included; user reward functions and their failures."""

import math
import sys

import pytest

from m1_jax.config import ConfigError
from m1_jax.rl.rewards import RewardError, Scorer, as_number, exact_match, final_answer, math_match, normalize


@pytest.mark.parametrize("response, answer, expected", [
    ("46", "46", 1.0), (" 46. ", "46", 1.0), ("Blue  Sky", "blue sky", 1.0), ("46 ", "047", 0.0),
    ("4 6", "46", 0.0), ("", "46", 0.0), ("\x00\ufffd", "46", 0.0), ("1234", "123", 0.0),
])
def test_exact_match(response, answer, expected):
    assert exact_match(response, answer) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("so the total is 42", "42", 1.0),
    ("first 3, then 5, finally 12.", "12", 1.0),
    ("The answer is \\boxed{7}. Check: 7 * 2 = 14", "7", 1.0),  # boxed wins over the last number
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("x = 0.50", "1/2", 1.0), ("we need 1,234 apples", "1234", 1.0),
    ("it is -3", "-3", 1.0), ("-3", "3", 0.0), ("\\boxed{\\text{Blue}}", "blue", 1.0),
    ("\\boxed{x^2 + {1}}", "x^2 + {1}", 1.0),  # nested braces, not a number: text comparison
    ("no number here", "3", 0.0), ("", "3", 0.0), ("\\boxed{", "3", 0.0), ("\\boxed{3", "3", 1.0),
    ("1/0", "3", 0.0), ("3.000", "3", 1.0), ("about 72^\\circ", "72", 1.0), ("42", "forty-two", 0.0),
])
def test_math_answers(response, answer, expected):
    assert math_match(response, answer) == expected


def test_answer_helpers():
    assert final_answer("a \\boxed{1} b \\boxed{2}") == "2" and final_answer("nothing") is None
    assert as_number("$1,000") == 1000 and as_number("3/4") == as_number("0.75") and as_number("abc") is None
    assert normalize("  Hello   World. ") == "hello world"


def test_user_reward_function_and_its_failures(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompt, response):\n    return len(response) / 10\n"
        "def broken(prompt, response):\n    if response == 'bad':\n        raise KeyError('oops')\n    return 1.0\n"
        "def nan(prompt, response):\n    return float('nan')\n"
        "def text(prompt, response):\n    return 'high'\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    s = Scorer("my_rewards:length", default="exact")
    assert s(["p", "q"], ["abc", "abcdefghij"], ["x", "y"]) == ([0.3, 1.0], 0)
    with pytest.raises(RewardError, match=r"raised KeyError: 'oops' on prompt 'q', response 'bad'"):
        Scorer("my_rewards:broken", default="exact")(["p", "q"], ["ok", "bad"], ["", ""])
    for name, problem in (("nan", "returned nan"), ("text", "returned 'high'")):
        with pytest.raises(RewardError, match=problem):
            Scorer(f"my_rewards:{name}", default="exact")(["p"], ["r"], [""])
    reports = []
    s = Scorer("my_rewards:broken", default="exact", on_error="score", error_value=-1.0, report=reports.append)
    assert s(["p", "q", "z"], ["bad", "ok", "bad"], ["", "", ""]) == ([-1.0, 1.0, -1.0], 2)
    assert s.errors == 2 and len(reports) == 2 and "prompt 'z', response 'bad'" in reports[1]
    for spec, match in (("my_rewards", "package.module:function"), ("nosuchmodule:f", "cannot import"),
                        ("my_rewards:missing", "cannot import"), ("my_rewards:NOT_CALLABLE", "not callable")):
        with pytest.raises(ConfigError, match=match):
            Scorer(spec, default="exact")
    with pytest.raises(ConfigError, match="reward_errors"):
        Scorer("exact", default="exact", on_error="ignore")


def test_builtin_scorers_never_raise_on_malformed_responses():
    for name in ("exact", "math"):
        s = Scorer(name, default="exact")
        rewards, failed = s(["p"] * 4, ["", "\\boxed{", "1/0", "\ufffd\x00"], ["1", "2", "3", "4"])
        assert failed == 0 and all(r == 0.0 for r in rewards) and all(math.isfinite(r) for r in rewards)
    assert Scorer("auto", default="math").name == "math"
