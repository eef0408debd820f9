"""Text in (`qlin eval --text`, `qlin quantize --calib-text`): a UTF-8 file, tokenized with a
model folder's own tokenizer, as model inputs; and the scores of a float and an int8 model on it.

Causal LMs see the whole text as one token sequence `(T,)` cut into windows of `max_length`
tokens, `stride` apart (the usual sliding-window perplexity recipe). Each token after the first
is scored once, in the first window that holds it after some context: window k starts at
`starts[k]`; it scores the targets from `max(end of window k-1, starts[k] + 1)` to its end, the
logits at window position p - 1 predicting the token at position p. So a token is predicted
from at least `max_length - stride` tokens of context once the first window is past (with
`stride == max_length` the first token of each window is not scored). All windows have the same
length (the last one ends at the text's end and may overlap its neighbour more), so they batch.

Encoders see each non-empty line as a sentence `(lines, max_length)` padded on the right; a
sentence's embedding is the mean of the last hidden states over its real tokens.

A text is budgeted like tensors (`max_memory`): before it is read, at most 13 bytes a byte of
file (the bytes, the string, up to 4 bytes a character, and int64 token ids, at most one a
byte); before the windows or lines are made, their int64 ids and mask. A text of more than
`CHUNK` characters is tokenized a chunk at a time (the tokenizer's own memory, ~100 bytes a
token, follows the chunk), with progress: chunks end before a white space between two words,
on a line break where there is one, so that the pieces are tokenized as in one call; the
tokenizer's special tokens (BOS; CLS and SEP) are added once, around the whole. A tokenizer
that marks the start of its input (SentencePiece's leading "▁") marks each chunk's start too,
a token or so every CHUNK characters. An encoder's line longer than its window is tokenized
only as far as its first `max_length` tokens need.

A one-home note: data.py holds generic inputs and batches; this module holds what is particular
to text (tokens, windows, lines, perplexity and sentence embeddings), so that neither data.py
nor api.py need know what a tokenizer is.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .budget import check_budget
from .data import Inputs, Progress, run_model
from .errors import ConfigError, InputError
from .files import check_file
from .hf import encode, is_causal_lm, position_limit

__all__ = [
    "DEFAULT_MAX_LENGTH", "read_text", "TextInputs", "text_inputs", "window_starts", "first_scored",
    "lm_scores", "embedding_scores",
]

DEFAULT_MAX_LENGTH = 1024  # tokens, when the model's config gives a longer limit or none
CHUNK = 2**20  # characters of text per tokenizer call
NEAREST_ROWS = 1024  # lines whose similarities to every line are held at once (embedding_scores)
TEXT_BYTES = 13  # bytes held per byte of text file while it is tokenized (module docstring)


def read_text(path: str | Path, what: str = "text") -> str:
    """The contents of a UTF-8 text file; InputError if it is missing, not UTF-8, or holds only
    white space; refused unread if tokenizing it could take more than `max_memory`."""
    path = check_file(path, what)
    check_budget(TEXT_BYTES * path.stat().st_size, f"{what} {path} (read and tokenized)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise InputError(f"{what} {path} holds no text (only white space)")
    return text


def window_starts(tokens: int, max_length: int, stride: int) -> list[int]:
    """Where each window of `max_length` tokens starts in a text of `tokens` tokens: every
    `stride` tokens while a window ends before the text does, then one that ends at its end."""
    assert 1 <= stride <= max_length <= tokens
    return list(range(0, tokens - max_length, stride)) + [tokens - max_length]


def first_scored(starts: list[int], max_length: int) -> list[int]:
    """For each window, the window position of its first scored target: past the end of the
    previous window, and never position 0 (a window's first token has no context in it)."""
    ends = [0] + [s + max_length for s in starts[:-1]]
    return [max(end - start, 1) for start, end in zip(starts, ends)]


@dataclass(frozen=True)
class TextInputs:
    """A text file made into model inputs.

    inputs: {"input_ids": (N, L), "attention_mask": (N, L)}: N windows (causal LMs) or lines
        (encoders), L = max_length for windows, the longest line's length for lines.
    kind: "causal-lm" or "encoder".
    tokens: tokens in the text (causal LMs) or in all lines (encoders).
    max_length, stride: the window (stride None for encoders: lines are truncated to max_length).
    first: for windows, the window position of each window's first scored target (first_scored).
    truncated: lines longer than max_length (encoders).
    """

    path: str
    inputs: dict[str, torch.Tensor]
    kind: str
    tokens: int
    max_length: int
    stride: int | None
    first: tuple[int, ...] = ()
    truncated: int = 0

    @property
    def samples(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def scored(self) -> int:
        """Targets scored (causal LMs): every token but the first, less the first token of each
        window when stride == max_length."""
        return sum(self.max_length - f for f in self.first)


def _check_lengths(model: nn.Module, max_length: int | None, stride: int | None) -> tuple[int, int]:
    limit = position_limit(model)
    if max_length is None:
        max_length = min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if max_length < 2:
        raise ConfigError(f"`max_length` {max_length}: a window needs at least 2 tokens")
    if limit is not None and max_length > limit:
        raise ConfigError(f"`max_length` {max_length} is more than the model's {limit} positions")
    if stride is None:
        stride = max(max_length // 2, 1)
    if not 1 <= stride <= max_length:
        raise ConfigError(f"`stride` {stride}: give 1 to `max_length` ({max_length}) tokens")
    return max_length, stride


# where a chunk may end: a line break between two non-blank characters, else any white space
# between two words (the tokenizer splits there anyway: the pieces tokenize as the whole does)
_LINE_BREAK = re.compile(r"(?<=\S)\n(?=\S)")
_WORD_BREAK = re.compile(r"(?<=\S)\s(?=\S)")


def _chunk_ends(text: str, size: int) -> Iterator[int]:
    """Where each chunk of at most `size` characters of `text` ends (the last: len(text)): at
    the last line break in its reach, else the last break between words, else at `size`."""
    start = 0
    while len(text) - start > size:
        end = start + size
        for pattern in (_LINE_BREAK, _WORD_BREAK):
            last = None
            for last in pattern.finditer(text, start + size // 2, end):
                pass
            if last is not None:
                end = last.start()
                break
        yield end
        start = end
    yield len(text)


def _special_ends(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own (BOS; CLS and SEP), from one
    word encoded with and without them."""
    full, bare = encode(tokenizer, "a"), encode(tokenizer, "a", special=False)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def _encode_text(tokenizer: Any, text: str, progress: Progress | None = None) -> torch.Tensor:
    """The token ids `(T,)` of a whole text, special tokens included: in one tokenizer call up to
    `CHUNK` characters, else a chunk at a time (module docstring), with `progress`."""
    if len(text) <= CHUNK:
        return torch.tensor(encode(tokenizer, text), dtype=torch.long)
    before, after = _special_ends(tokenizer)
    parts, start = [torch.tensor(before, dtype=torch.long)], 0
    for end in _chunk_ends(text, CHUNK):
        parts.append(torch.tensor(encode(tokenizer, text[start:end], special=False), dtype=torch.long))
        start = end
        if progress is not None:
            progress(end, len(text), "tokenizing (characters)")
    parts.append(torch.tensor(after, dtype=torch.long))
    return torch.cat(parts)


def _encode_line(tokenizer: Any, line: str, max_length: int) -> list[int]:
    """A line's token ids with the special tokens, as far as its first `max_length` tokens need
    (more than `max_length` when it is longer: the caller counts and cuts it): a long line is
    tokenized from its start, 16 characters a token at first, 4 times more each time that
    was not enough (a piece's last token may be cut short, so a piece must give 2 more)."""
    reach = 16 * max_length
    while len(line) > reach:
        ids = encode(tokenizer, line[:reach])
        if len(ids) > max_length + 2:
            return ids
        reach *= 4
    return encode(tokenizer, line)


def text_inputs(
    model: nn.Module, tokenizer: Any, text: str, path: str | Path, *, max_length: int | None = None,
    stride: int | None = None, what: str = "text", progress: Progress | None = None,
) -> TextInputs:
    """Tokenize `text` (read_text of the file `path`, named in messages) with `tokenizer`
    (special tokens as the tokenizer adds them) for `model`: sliding windows for a causal LM,
    padded lines for an encoder; a long text in chunks, with `progress(done, total, what)`.
    `max_length` defaults to the model's position limit (at most DEFAULT_MAX_LENGTH), `stride`
    to half of it. InputError for a text shorter than one window, or fewer than two lines."""
    if getattr(model, "main_input_name", None) != "input_ids":
        raise InputError(f"`{what}` needs a model that takes token ids; {type(model).__name__} does not")
    causal = is_causal_lm(model)
    if stride is not None and not causal:
        raise ConfigError(f"`stride` moves the windows of a causal LM; {type(model).__name__} is an encoder, "
                          "whose text is a sentence a line")
    max_length, stride = _check_lengths(model, max_length, stride)
    if causal:
        ids = _encode_text(tokenizer, text, progress)  # (T,)
        if ids.numel() < max_length:
            raise InputError(
                f"{what} {path} is {ids.numel()} tokens, shorter than one window of `max_length` {max_length}: "
                "give a longer text or a smaller `max_length`"
            )
        starts = window_starts(ids.numel(), max_length, stride)
        check_budget(2 * len(starts) * max_length * 8, f"{what} {path} as {len(starts):,} windows of {max_length} tokens")
        windows = torch.stack([ids[s : s + max_length] for s in starts])  # (N, L)
        return TextInputs(str(path), {"input_ids": windows, "attention_mask": torch.ones_like(windows)},
                          "causal-lm", ids.numel(), max_length, stride, tuple(first_scored(starts, max_length)))
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise InputError(f"{what} {path} has {len(lines)} non-empty line: an encoder's text needs at least 2 "
                         "sentences, one a line (the neighbour agreement compares them)")
    encoded = []
    for i, line in enumerate(lines):
        encoded.append(_encode_line(tokenizer, line, max_length))
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1, len(lines), "tokenizing lines")
    truncated = sum(len(e) > max_length for e in encoded)
    encoded = [e[:max_length] for e in encoded]
    width = max(len(e) for e in encoded)
    check_budget(2 * len(encoded) * width * 8, f"{what} {path} as {len(encoded):,} lines of up to {width} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (lines, width), padded on the right
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    return TextInputs(str(path), {"input_ids": ids, "attention_mask": mask}, "encoder",
                      int(mask.sum()), max_length, None, truncated=truncated)


def _chunks(text: TextInputs, batch_size: int):
    n = text.samples
    for start in range(0, n, batch_size):
        yield start, {k: v[start : start + batch_size] for k, v in text.inputs.items()}


def _to(inputs: Inputs, dev: torch.device) -> Inputs:
    return {k: v.to(dev) for k, v in inputs.items()}


@torch.no_grad()
def lm_scores(models: dict[str, nn.Module], text: TextInputs, batch_size: int, device: torch.device,
              progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity of each model (`{"float": m, "int8": m}`) on the scored targets of `text`'s
    windows, and the share of targets where both models' top-1 next token is the same.

    perplexity = exp(sum of -log p(target | context) / targets), summed in float64; the logits
    of each model are compared at the same positions. Also each model's wall time (s)."""
    for model in models.values():  # the eval's own models: no key/value cache to keep between windows
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    nll = {name: 0.0 for name in models}
    seconds = {name: 0.0 for name in models}
    agree = count = 0
    for start, chunk in _chunks(text, batch_size):
        ids = chunk["input_ids"]  # (B, L)
        # targets: (B, L - 1) next tokens; keep[b, p] says whether ids[b, p + 1] is scored here
        pos = torch.arange(1, text.max_length)
        first = torch.tensor(text.first[start : start + ids.shape[0]])
        keep = pos[None, :] >= first[:, None]  # (B, L - 1)
        targets = ids[:, 1:][keep]  # (K,)
        top1 = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            out = run_model(model, _to(chunk, device), f"{name} model")
            logits = out.logits[:, :-1][keep.to(out.logits.device)].float().cpu()  # (K, vocab)
            seconds[name] += time.perf_counter() - t0
            nll[name] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double())
            top1[name] = logits.argmax(-1)
        a, b = top1.values()
        agree += int((a == b).sum())
        count += int(targets.numel())
        if progress is not None:
            progress(start + ids.shape[0], text.samples, "scoring windows")
    assert count == text.scored, (count, text.scored)
    ppl = {name: math.exp(total / count) for name, total in nll.items()}
    return {
        "perplexity_float": ppl["float"], "perplexity_int8": ppl["int8"],
        "perplexity_ratio": ppl["int8"] / ppl["float"], "next_token_agreement": agree / count,
        "seconds": seconds,
    }


def _last_hidden(out: Any) -> torch.Tensor:
    """(B, L, hidden): the last hidden states of a transformers output."""
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        return hidden[-1]
    last = getattr(out, "last_hidden_state", None)
    if last is None:
        raise InputError(f"the model output ({type(out).__name__}) has no hidden states to pool into embeddings")
    return last


@torch.no_grad()
def embedding_scores(models: dict[str, nn.Module], text: TextInputs, batch_size: int, device: torch.device,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Mean-pooled sentence embeddings `(lines, hidden)` of each model: the cosine between a
    line's float and int8 embedding (mean and min over lines), and the share of lines whose
    nearest other line (by cosine) is the same under both models. Also each wall time (s)."""
    for model in models.values():  # the eval's own models: ask for every layer's hidden states
        if getattr(model, "config", None) is not None:
            model.config.output_hidden_states = True
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    for start, chunk in _chunks(text, batch_size):
        if progress is not None:
            progress(start, text.samples, "embedding lines")
        mask = chunk["attention_mask"].unsqueeze(-1).double()  # (B, L, 1)
        for name, model in models.items():
            t0 = time.perf_counter()
            hidden = _last_hidden(run_model(model, _to(chunk, device), f"{name} model"))
            seconds[name] += time.perf_counter() - t0
            pooled = (hidden.double().cpu() * mask).sum(1) / mask.sum(1)  # (B, hidden)
            parts[name].append(pooled)
    ref, out = torch.cat(parts["float"]), torch.cat(parts["int8"])  # (lines, hidden)
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=1, eps=1e-12)  # (lines,)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        """Each line's nearest other line, `NEAREST_ROWS` lines at a time: the whole (lines,
        lines) similarity of a text of a million short lines would be 8 TB."""
        unit = torch.nn.functional.normalize(e, dim=1, eps=1e-12)
        found = []
        for i in range(0, unit.shape[0], NEAREST_ROWS):
            sim = unit[i : i + NEAREST_ROWS] @ unit.T  # (rows, lines)
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + i] = -math.inf  # not the line itself
            found.append(sim.argmax(1))
        return torch.cat(found)

    return {
        "embedding_cosine_mean": float(cosine.mean()), "embedding_cosine_min": float(cosine.min()),
        "neighbour_agreement": float((nearest(ref) == nearest(out)).double().mean()),
        "seconds": seconds,
    }
