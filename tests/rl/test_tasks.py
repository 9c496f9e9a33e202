"""Synthetic tasks (answers computed here independently from the prompt text), held-out prompts never
trained on, the prompt-order state, JSON-lines datasets and their errors."""

import json
import re

import numpy as np
import pytest

from m1_jax.config import ConfigError
from m1_jax.rl.tasks import SYNTHETIC_TASKS, Task


def _solve(prompt: str) -> str:
    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"(\d+)\*(\d+)=", prompt):
        return str(int(m[1]) * int(m[2]))
    if m := re.fullmatch(r"sort (\d+)=", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"count (\d):(\d+)=", prompt):
        return str(sum(c == m[1] for c in m[2]))
    if m := re.fullmatch(r"copy (\d+)=", prompt):
        return m[1]
    raise AssertionError(f"unknown prompt format {prompt!r}")


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_synthetic_answers_are_right(name):
    task = Task(name, 3)
    rng = np.random.default_rng(0)
    examples = [task.draw(rng) for _ in range(200)]
    assert all(ex.answer == _solve(ex.prompt) for ex in examples)
    assert len({ex.prompt for ex in examples}) > 100  # varied
    if name in ("addition", "multiplication"):
        assert max(len(ex.prompt) for ex in examples) == 8  # up to 3 digits per operand


def test_mixed_tasks_held_out_and_resume():
    task = Task("addition, counting,copying", 2)
    held, train = task.split(50, seed=3)
    assert len({ex.prompt for ex in held}) == 50
    kinds = {re.sub(r"\d", "", ex.prompt) for ex in held}
    assert kinds == {"+=", "count :=", "copy ="}
    first = train.take(300)
    assert not {ex.prompt for ex in first} & {ex.prompt for ex in held}  # held-out prompts are never trained on
    state = json.loads(json.dumps(train.get_state()))  # what a checkpoint stores
    nxt = train.take(20)
    again = task.split(50, seed=3)[1]
    again.set_state(state)
    assert again.take(20) == nxt
    assert task.split(50, seed=3, stream=1)[1].take(20) != task.split(50, seed=3)[1].take(20)
    assert task.split(50, seed=3, stream=1)[0] == held


def test_dataset_tasks(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "solution": i + 1}) for i in range(10)) + "\n")
    task = Task(str(path), 1, prompt_key="question", answer_key="solution")
    assert task.default_reward == "math" and not task.synthetic
    held, train = task.split(3, seed=0)
    seen = train.take(14)  # 7 training records: two epochs, a new order each
    assert {ex.prompt for ex in seen[:7]} == {ex.prompt for ex in seen[7:]} and seen[:7] != seen[7:]
    assert not {ex.prompt for ex in seen} & {ex.prompt for ex in held}
    state = train.get_state()
    nxt = train.take(5)
    train.set_state(state)
    assert train.take(5) == nxt
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "solution": 1}\n{"question": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: no field 'solution'"):
        Task(str(bad), 1, prompt_key="question", answer_key="solution")
    bad.write_text("not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not a JSON object"):
        Task(str(bad), 1)
    with pytest.raises(ConfigError, match="no such file"):
        Task(str(tmp_path / "missing.jsonl"), 1)
    with pytest.raises(ConfigError, match="cannot give RLConfig.eval_prompts = 10"):
        task.split(10, seed=0)


@pytest.mark.parametrize("spec, size, match", [("adition", 2, "RLConfig.task = 'adition' is invalid"),
                                               ("", 2, "RLConfig.task"), ("sorting", 0, "RLConfig.task_size")])
def test_bad_task_specs(spec, size, match):
    with pytest.raises(ConfigError, match=match):
        Task(spec, size)
