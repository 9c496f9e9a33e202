"""Prompts with known answers: synthetic tasks generated on the fly, or a JSON-lines dataset.

Synthetic tasks (``size`` = digits per operand, or list length):

==================  ===================  ==========
task                prompt               answer
==================  ===================  ==========
``addition``        ``37+85=``           ``122``
``multiplication``  ``37*85=``           ``3145``
``sorting``         ``sort 3142=``       ``1234``
``counting``        ``count 3:31433=``   ``3``
``copying``         ``copy 3142=``       ``3142``
==================  ===================  ==========

Several comma-separated names mix them (each prompt picks one uniformly). A dataset is a ``.jsonl``
file with a prompt and an answer field per line (``RLConfig.prompt_key`` / ``answer_key``).

A :class:`PromptSource` hands out training prompts in a reproducible order whose position
(``get_state`` / ``set_state``, JSON) is saved in every checkpoint, and never hands out a held-out
(evaluation) prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from m1_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _digits(rng, size: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size))


def _addition(rng, size):
    a, b = (int(rng.integers(0, 10 ** size)) for _ in range(2))
    return Example(f"{a}+{b}=", str(a + b))


def _multiplication(rng, size):
    a, b = (int(rng.integers(0, 10 ** size)) for _ in range(2))
    return Example(f"{a}*{b}=", str(a * b))


def _sorting(rng, size):
    s = _digits(rng, size)
    return Example(f"sort {s}=", "".join(sorted(s)))


def _counting(rng, size):
    s = _digits(rng, size)
    d = s[int(rng.integers(0, size))] if rng.uniform() < 0.8 else str(int(rng.integers(0, 10)))
    return Example(f"count {d}:{s}=", str(s.count(d)))


def _copying(rng, size):
    s = _digits(rng, size)
    return Example(f"copy {s}=", s)


SYNTHETIC_TASKS: dict[str, Callable[[np.random.Generator, int], Example]] = {
    "addition": _addition, "multiplication": _multiplication, "sorting": _sorting, "counting": _counting,
    "copying": _copying,
}


class Task:
    """A synthetic task (or mix) or a dataset: ``draw(rng)`` / ``records``, plus the default reward."""

    def __init__(self, spec: str, size: int, *, prompt_key: str = "prompt", answer_key: str = "answer"):
        self.spec = spec
        self.size = size
        self.records: list[Example] | None = None
        if spec.endswith((".jsonl", ".json", ".ndjson")) or os.sep in spec:
            self.records = read_dataset(spec, prompt_key, answer_key)
            self.names: list[str] = []
            self.default_reward = "math"
        else:
            self.names = [n.strip() for n in spec.split(",") if n.strip()]
            bad = [n for n in self.names if n not in SYNTHETIC_TASKS]
            if not self.names or bad:
                raise ConfigError(f"RLConfig.task = {spec!r} is invalid: expected synthetic task names from "
                                  f"{sorted(SYNTHETIC_TASKS)} (comma-separated) or a .jsonl file path")
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"RLConfig.task_size = {size!r} is invalid: expected a positive integer")
            self.default_reward = "exact"

    @property
    def synthetic(self) -> bool:
        return self.records is None

    def draw(self, rng: np.random.Generator) -> Example:
        name = self.names[int(rng.integers(0, len(self.names)))] if len(self.names) > 1 else self.names[0]
        return SYNTHETIC_TASKS[name](rng, self.size)

    def split(self, n_eval: int, seed: int, stream: int = 0, *, eval_seed: int | None = None
              ) -> tuple[list[Example], "SyntheticPrompts | DatasetPrompts"]:
        """``n_eval`` held-out examples (fixed by ``eval_seed``, default ``seed``) and a source of training
        prompts (ordered by ``seed`` and ``stream``: the warm-up uses stream 1) that never hands one of them out."""
        eval_seed = seed if eval_seed is None else eval_seed
        if self.synthetic:
            rng = np.random.default_rng([eval_seed, 1])
            held: dict[str, Example] = {}
            for _ in range(100 * n_eval):
                if len(held) == n_eval:
                    break
                ex = self.draw(rng)
                held.setdefault(ex.prompt, ex)
            return list(held.values()), SyntheticPrompts(self, seed, exclude=set(held), stream=stream)
        order = np.random.default_rng([eval_seed, 1]).permutation(len(self.records))
        if len(self.records) <= n_eval:
            raise ConfigError(f"RLConfig.task = {self.spec!r}: {len(self.records)} records cannot give "
                              f"RLConfig.eval_prompts = {n_eval} held-out prompts and leave any for training")
        held = [self.records[i] for i in order[:n_eval]]
        train = [self.records[i] for i in order[n_eval:]]
        return held, DatasetPrompts(train, seed, stream=stream)


def read_dataset(path: str, prompt_key: str, answer_key: str) -> list[Example]:
    """Every line of a JSON-lines file as an :class:`Example`; errors name the file, the line and the field."""
    if not os.path.isfile(path):
        raise ConfigError(f"RLConfig.task = {path!r}: no such file (expected a synthetic task name or a .jsonl file "
                          "with prompt and answer fields)")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{i}: not a JSON object ({e})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            for key in (prompt_key, answer_key):
                if key not in rec:
                    raise ConfigError(f"{path}:{i}: no field {key!r} (RLConfig.prompt_key / answer_key); fields: "
                                      f"{sorted(rec)[:10]}")
            if not isinstance(rec[prompt_key], str) or not rec[prompt_key]:
                raise ConfigError(f"{path}:{i}: field {prompt_key!r} must be a non-empty string")
            out.append(Example(rec[prompt_key], str(rec[answer_key])))
    if not out:
        raise ConfigError(f"{path}: holds no records")
    return out


class SyntheticPrompts:
    """Training prompts of a synthetic task: a seeded stream (its generator state is the position)."""

    def __init__(self, task: Task, seed: int, exclude: set[str], stream: int = 0):
        self.task = task
        self.exclude = exclude
        self.rng = np.random.default_rng([seed, 0, stream])

    def take(self, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            ex = self.task.draw(self.rng)
            if ex.prompt not in self.exclude:
                out.append(ex)
        return out

    def get_state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class DatasetPrompts:
    """Training prompts of a dataset: a new seeded permutation each epoch; the position is (epoch, index)."""

    def __init__(self, records: Sequence[Example], seed: int, stream: int = 0):
        self.records = list(records)
        self.seed, self.stream = seed, stream
        self.epoch, self.index = 0, 0
        self._order = self._perm()

    def _perm(self):
        return np.random.default_rng([self.seed, 2, self.stream, self.epoch]).permutation(len(self.records))

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.index == len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._perm()
