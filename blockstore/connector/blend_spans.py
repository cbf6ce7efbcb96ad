"""Scheduler-side arithmetic of the blend connector: where a prompt's chunks are, and how many of its
tokens the connector may claim from vLLM.

Pure Python (no torch, no vLLM) so the scheduler's decisions are unit-testable on their own.

A prompt in blend form is ``seg_0 SEP seg_1 SEP ... SEP seg_n``, as in LMCache's blend mode
(``blend_special_str``): every segment before the last is a chunk (a document, a memory item, a tool
output) whose KV is keyed by its own token ids, wherever it sits; the last segment is the new part
(the question) and is never a chunk. Separator tokens themselves belong to no chunk: vLLM's side of
the blend recomputes them like any token no chunk covers.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockstore.errors import InvalidArgument


def find_separator(token_ids: Sequence[int], separator_ids: Sequence[int], start: int = 0) -> int:
    """Index of the next occurrence of ``separator_ids`` in ``token_ids`` at or after ``start``; -1 if none."""
    n, m = len(token_ids), len(separator_ids)
    first = separator_ids[0]
    i = start
    while i <= n - m:
        if token_ids[i] == first and list(token_ids[i:i + m]) == list(separator_ids):
            return i
        i += 1
    return -1


def find_chunk_spans(token_ids: Sequence[int], separator_ids: Sequence[int],
                     min_chunk_tokens: int = 1) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the chunks of a prompt cut at the separator, in prompt order.

    Segments shorter than ``min_chunk_tokens`` (an empty one between two separators, a stray word) are
    not chunks: their KV would cost a record for almost nothing. A prompt without a separator has no
    chunk (it is an ordinary prompt: the prefix tier's business).
    """
    if not separator_ids:
        raise InvalidArgument("the blend separator is empty: give a separator string or token ids")
    if min_chunk_tokens < 1:
        raise InvalidArgument(f"min_chunk_tokens must be >= 1, got {min_chunk_tokens}")
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        sep = find_separator(token_ids, separator_ids, start)
        if sep < 0:
            return spans  # what follows the last separator is the new part, never a chunk
        if sep - start >= min_chunk_tokens:
            spans.append((start, sep))
        start = sep + len(separator_ids)


def claimable_tokens(prompt_len: int, num_computed_tokens: int, block_size: int) -> int:
    """How many tokens after ``num_computed_tokens`` the connector may claim: whole vLLM blocks only,
    and never the prompt's last token (vLLM must compute at least one token itself to produce the
    first output's logits)."""
    if block_size <= 0:
        raise InvalidArgument(f"block_size must be > 0, got {block_size}")
    end = (prompt_len - 1) // block_size * block_size
    return max(0, end - num_computed_tokens)


def covered_tokens(spans: Sequence[tuple[int, int]], present: Sequence[bool]) -> int:
    """Prompt tokens inside chunks whose KV the store holds."""
    return sum(end - start for (start, end), ok in zip(spans, present, strict=True) if ok)
