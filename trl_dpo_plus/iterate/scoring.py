"""`--reward_model PATH`: a local `AutoModelForSequenceClassification` as a TRL-style reward function, scored in
batches, so the rounds score samples through the same `compare.sampling.score` path as a `--reward_fn`."""

from __future__ import annotations

import os

import torch


class RewardModelScorer:
    """`scorer(prompts=[...], completions=[...]) -> list[float]`: the reward model's score (its first logit) of each
    prompt + completion, in batches of `batch_size`, on `device` (default: the GPU when there is one). A
    conversational prompt goes through the reward model's chat template with the completion as the assistant's turn."""

    def __init__(self, path: str, batch_size: int = 16, device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"--reward_model {path!r}: no such folder; name a local folder holding an "
                                    "AutoModelForSequenceClassification (config.json, weights, tokenizer)")
        self.__name__ = f"reward_model({os.path.basename(os.path.normpath(path))})"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size

    def _text(self, prompt, completion: str) -> str:
        if isinstance(prompt, str):
            return prompt + completion
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}],
                                                      tokenize=False)
        return "\n".join(turn["content"] for turn in prompt) + "\n" + completion

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], **kwargs) -> list[float]:
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(completions), self.batch_size):
            chunk = slice(i, i + self.batch_size)
            texts = [self._text(p, c) for p, c in zip(prompts[chunk], completions[chunk])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores
