"""Verifiable synthetic tasks for the RL loop: prompts, reference answers and a 0/1 reward.

The default task is sorting a string of digits: the prompt is the digits and "=", the answer is
the same digits in ascending order followed by an end token. Answers are as long as prompts, so
a sequence-level importance ratio multiplies a dozen per-token ratios. Tokens are their own tiny
vocabulary (digits, "=", end, pad), so a policy can be trained from scratch in a minute on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIGITS = "0123456789"
EQUALS, EOS, PAD = 10, 11, 12
VOCAB_SIZE = 16  # 13 used; rounded up


@dataclass
class SortTask:
    """Sort `length` random digits. Prompt: digits + "="; answer: sorted digits + end."""

    length: int = 10

    @property
    def prompt_len(self) -> int:
        return self.length + 1

    @property
    def answer_len(self) -> int:
        return self.length + 1

    def prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n random prompts: (n, length + 1) token ids."""
        digits = torch.randint(0, 10, (n, self.length), generator=generator)
        return torch.cat([digits, torch.full((n, 1), EQUALS)], dim=1)

    def answers(self, prompts: torch.Tensor) -> torch.Tensor:
        """Reference answers of prompts (n, P) -> (n, length + 1), ending with EOS."""
        digits = prompts[:, : self.length].sort(dim=1).values
        return torch.cat([digits, torch.full((len(prompts), 1), EOS)], dim=1)

    def reward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """1.0 where the response up to and including its first EOS is the answer, else 0.0.

        prompts (n, P), responses (n, R) with R >= answer_len -> (n,)
        """
        answers = self.answers(prompts)
        head = responses[:, : self.answer_len]
        return (head == answers).all(dim=1).float()

    def render(self, ids: list[int]) -> str:
        names = {EQUALS: "=", EOS: "<end>", PAD: "<pad>"}
        return "".join(DIGITS[i] if i < 10 else names.get(i, "?") for i in ids)


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (all if none): (n, R) -> (n, R) bool."""
    is_eos = responses == EOS
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # EOS tokens strictly before t
    return before == 0
