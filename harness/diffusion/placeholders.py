"""Text-embedding placeholders (textual inversion): reserved tokens whose input embeddings are replaced, per
call, by given vectors, trained ones (Gal et al.) or an encoder's outputs (a method's learned embedding of a
mask or an image), so that a prompt such as "a photo of sks" carries what the vector says. A placeholder may
stand for several vectors: `repeated` writes it k times, and (B, k, dim) vectors fill those positions in order
(AnomalyDiffusion's 8-token anomaly embedding).

The text encoder is not changed: a forward hook on its token-embedding layer swaps the rows of the placeholder
tokens for the call it is installed for, so gradients reach the vectors and nothing stays behind afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"placeholder {word!r} must be one known token of the tokenizer (it is {ids})")
    return ids[0]


class Placeholders:
    """Placeholder words of one tokenizer; `encode` injects their vectors into one text-encoder call."""

    def __init__(self, tokenizer, words: Sequence[str]):
        self.tokenizer = tokenizer
        self.ids = {word: single_token_id(tokenizer, word) for word in words}

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                              max_length=self.tokenizer.model_max_length).input_ids

    def encode(self, text_encoder, prompts: list[str], vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of `prompts` with each placeholder's embedding replaced by vectors[word]: (dim,) for every
        prompt, (len(prompts), dim) one per prompt, or (len(prompts), k, dim) for a placeholder written k times in
        each prompt (`repeated`), its occurrences in order."""
        device = next(text_encoder.parameters()).device
        ids = self.token_ids(prompts).to(device)
        with self.injected(text_encoder, ids, vectors):
            return text_encoder(ids)[0]

    @contextlib.contextmanager
    def injected(self, text_encoder, ids: torch.Tensor, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
        unknown = set(vectors) - set(self.ids)
        if unknown:
            raise ValueError(f"no placeholder {sorted(unknown)}; placeholders: {sorted(self.ids)}")
        positions = {word: ids == self.ids[word] for word in vectors}

        def replace(module, inputs, embeddings: torch.Tensor) -> torch.Tensor:
            out = embeddings
            for word, where in positions.items():
                if where.any():
                    vector = vectors[word].to(embeddings.dtype).to(embeddings.device)
                    if vector.ndim == 3:
                        out = _fill_in_order(out, where, vector, word)
                        continue
                    per_prompt = vector.expand(ids.shape[0], -1) if vector.ndim == 1 else vector
                    out = torch.where(where[..., None], per_prompt[:, None, :].expand_as(out), out)
            return out

        handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()


def word_norm(table: torch.Tensor) -> float:
    """The mean norm of a text encoder's word embeddings (its input table): the scale a placeholder's vectors start at
    when initialised from a word, and where `at_scale` keeps an encoder's tokens."""
    return float(table.detach().norm(dim=1).mean())


def at_scale(tokens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Each token (last dimension) L2-normalised and multiplied by `scale` (`word_norm`), or as it is where `scale` is
    None: an encoder's output written into a prompt, kept at the scale of the words beside it."""
    return tokens if scale is None else torch.nn.functional.normalize(tokens, dim=-1) * scale


def repeated(prompt: str, word: str, times: int) -> str:
    """`prompt` with the placeholder `word` written `times` times in a row (each occurrence takes one vector)."""
    if prompt.split().count(word) != 1:
        raise ValueError(f"prompt {prompt!r} must hold the placeholder {word!r} exactly once")
    return " ".join(" ".join([word] * times) if part == word else part for part in prompt.split())


def _fill_in_order(embeddings: torch.Tensor, where: torch.Tensor, vectors: torch.Tensor, word: str) -> torch.Tensor:
    """Each prompt's occurrences of `word` (where: (B, L)) replaced by its k vectors (B, k, dim), in order."""
    counts = where.sum(1)
    if vectors.shape[0] != where.shape[0] or bool((counts != vectors.shape[1]).any()):
        raise ValueError(f"placeholder {word!r} occurs {counts.tolist()} times in the prompts, but its vectors are "
                         f"{tuple(vectors.shape[:2])} (prompts, per prompt): write it with `repeated` (was the prompt "
                         "truncated by the tokenizer's length?)")
    out = embeddings.clone()
    out[where] = vectors.reshape(-1, vectors.shape[-1])  # row-major: prompt by prompt, positions in order
    return out


class TrainedVectors(torch.nn.Module):
    """Trainable placeholder vectors, each initialised from the embedding of a word (textual inversion's start)."""

    def __init__(self, text_encoder, tokenizer, inits: dict[str, str]):
        super().__init__()
        table = text_encoder.get_input_embeddings().weight.detach()
        self.vectors = torch.nn.ParameterDict({
            placeholder: torch.nn.Parameter(table[single_token_id(tokenizer, word)].clone())
            for placeholder, word in inits.items()})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.vectors.items())
