"""``RLConfig``: the RL fine-tuning run (``TrainConfig.mode = 'rl'``); gin-registered in m1_jax/train/config.py.

One RL step = a rollout batch (``prompts_per_step`` prompts x ``group_size`` samples), then ``epochs`` passes of
``minibatches`` optimizer updates over it. ``TrainConfig.steps`` counts RL steps; the optimizer schedule
runs over ``steps x epochs x minibatches`` updates.
"""

from __future__ import annotations

import dataclasses
import math

from m1_jax.config import require
from m1_jax.rl.losses import LOSS_DEFAULTS

REWARD_ERRORS = ("raise", "score")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Fields (see docs/rl.md):

    ``task``, ``task_size``: synthetic task name(s) (``addition``, ``multiplication``, ``sorting``, ``counting``,
    ``copying``; comma-separated mixes) and their digits / length, or a ``.jsonl`` file with ``prompt_key`` and
    ``answer_key`` fields. ``reward``: ``auto`` (``exact`` for synthetic tasks, ``math`` for datasets),
    ``exact``, ``math`` or ``package.module:function`` (``(prompt, response) -> float``); ``reward_errors``:
    ``raise`` (stop the run naming the sample) or ``score`` (score ``reward_error_value``, count, print).
    ``stop_text``: the end marker of an answer (one token; the warm-up teaches it, rollouts stop on it).

    ``loss``: ``cispo``, ``dapo``, ``grpo`` or ``ppo``; ``eps_low`` / ``eps_high``: its clip bounds (``None``:
    the loss's defaults, CISPO's lower bound is off). ``dynamic_sampling``: drop groups whose rewards are all
    equal, drawing up to ``max_rollout_batches`` rollout batches to fill the step; ``scale_advantages``:
    divide by the group's std (GRPO) or only centre (Dr. GRPO).

    ``max_prompt_len`` / ``max_response_len``: tokens; ``temperature``: of the rollouts (1 = on-policy
    log-probabilities); ``certain_stop_tokens`` / ``certain_stop_prob``: the M1 repetition stop (a rollout ends
    once its last n tokens each had probability >= p; 0 = off).

    ``eval_every``, ``eval_prompts``, ``eval_samples``: evaluation on held-out prompts (never trained on):
    ``eval_samples`` samples per prompt at the rollout temperature (``eval/reward_mean``) and the greedy answer
    (``eval/greedy_reward_mean``); ``eval_samples = 0``: greedy only. ``eval_seed`` draws the held-out prompts
    (independent of ``TrainConfig.seed``, so runs of different seeds are evaluated on the same prompts).
    ``init_checkpoint``: a training step or run folder to start from; ``None``: a supervised warm-up of
    ``warmup_steps`` steps (batch ``warmup_batch_size``, learning rate ``warmup_learning_rate``) on the task,
    in ``run_dir/warmup``. ``logprob_chunk_size``: tokens per chunk of the float32 LM head in the update.
    """

    task: str = "addition"
    task_size: int = 2
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    reward: str = "auto"
    reward_errors: str = "raise"
    reward_error_value: float = 0.0
    stop_text: str = "\n"
    loss: str = "cispo"
    eps_low: float | None = None
    eps_high: float | None = None
    prompts_per_step: int = 16
    group_size: int = 8
    minibatches: int = 4
    epochs: int = 1
    dynamic_sampling: bool = True
    max_rollout_batches: int = 3
    scale_advantages: bool = True
    max_prompt_len: int = 16
    max_response_len: int = 8
    temperature: float = 1.0
    certain_stop_tokens: int = 0
    certain_stop_prob: float = 0.99
    eval_every: int = 10
    eval_prompts: int = 128
    eval_samples: int = 4
    eval_seed: int = 0
    init_checkpoint: str | None = None
    warmup_steps: int = 100
    warmup_batch_size: int = 32
    warmup_learning_rate: float = 3e-3
    logprob_chunk_size: int = 1024

    def validate(self) -> None:
        def need(cond, field, expected):
            require(cond, self, field, expected)

        def positive_int(field):
            v = getattr(self, field)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, field, "a positive integer")

        for f in ("task_size", "prompts_per_step", "group_size", "minibatches", "epochs", "max_rollout_batches",
                  "max_prompt_len", "max_response_len", "eval_every", "eval_prompts", "warmup_batch_size",
                  "logprob_chunk_size"):
            positive_int(f)
        need(isinstance(self.task, str) and self.task.strip(), "task", "a task name or a .jsonl path")
        need(self.loss in LOSS_DEFAULTS, "loss", f"one of {sorted(LOSS_DEFAULTS)}")
        need(self.group_size >= 2, "group_size", "at least 2 (advantages are relative to the group)")
        need(self.prompts_per_step % self.minibatches == 0, "minibatches",
             f"a divisor of RLConfig.prompts_per_step = {self.prompts_per_step} (minibatches hold whole groups)")
        for f in ("eps_low", "eps_high"):
            v = getattr(self, f)
            need(v is None or (isinstance(v, (int, float)) and v > 0 and not math.isnan(v)), f, "None or a positive number")
        need(self.reward_errors in REWARD_ERRORS, "reward_errors", f"one of {REWARD_ERRORS}")
        need(isinstance(self.reward_error_value, (int, float)) and math.isfinite(self.reward_error_value),
             "reward_error_value", "a finite number")
        need(isinstance(self.stop_text, str) and self.stop_text != "", "stop_text", "a non-empty string")
        need(isinstance(self.temperature, (int, float)) and self.temperature > 0, "temperature",
             "a positive number (rollouts sample; 1.0 keeps the sampler's log-probabilities on-policy)")
        need(isinstance(self.certain_stop_tokens, int) and self.certain_stop_tokens >= 0, "certain_stop_tokens",
             "an integer >= 0 (0 = off)")
        need(0.0 < self.certain_stop_prob <= 1.0, "certain_stop_prob", "a probability in (0, 1]")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(isinstance(self.eval_samples, int) and self.eval_samples >= 0, "eval_samples", "an integer >= 0")
        need(isinstance(self.eval_seed, int), "eval_seed", "an integer")
        need(self.warmup_learning_rate > 0, "warmup_learning_rate", "a positive number")
        need(self.init_checkpoint is None or (isinstance(self.init_checkpoint, str) and self.init_checkpoint),
             "init_checkpoint", "None or a training step / run folder")

    @property
    def rows(self) -> int:
        """Responses per rollout batch."""
        return self.prompts_per_step * self.group_size

    @property
    def minibatch_rows(self) -> int:
        return self.rows // self.minibatches

    @property
    def seq_len(self) -> int:
        """Tokens per update row: prompt + response (the inputs are one shorter)."""
        return self.max_prompt_len + self.max_response_len

    def updates(self, steps: int) -> int:
        return steps * self.epochs * self.minibatches
