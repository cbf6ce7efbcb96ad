"""Which covered tokens a blend recomputes (issue 15): the selectors the blender runs at its check layer.

At the check layer every row has a fresh K and V (the layers before it ran in full) beside the cached
ones the chunks brought; `select` picks the covered rows to recompute from there on within the ratio's
budget (count: round(ratio * covered rows), the sink tokens and a last row inside a chunk counted in
it), `narrow` narrows a wider pick one layer later (CacheBlend's gradual filtering). On a GPU nothing
here reads a value back from the device: counts come from the spans, not from masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SELECTORS = ("deviation", "epic")
# The default selection: K and V deviation weighted by the question's attention. On the trained model
# (200 prompts, bench/README.md, Fidelity) it gives top-1 0.935 at ratio 0.15 against 0.895 for V alone
# (first-token KL 0.017 vs 0.028), and an 8B-shaped blend on an H100 is no slower with it (warm 2.72-2.84x
# vs 2.69-2.70x of full prefill at 4k, two runs).
DEFAULT_DEVIATION = "kv"
DEFAULT_QUERY_WEIGHTED = True
# The deviation selector's score is divided by (the token's distance to the question) ** DEFAULT_RECENCY.
# Where the attention oracle (bench/blend_fidelity.py) and the check layer's score part: the oracle's rows
# lie mostly in the last chunk, where the later layers' attention of the answer goes, and only half of
# them were the default's picks. Measured on two disjoint prompt sets of 200 (bench/blend_selectors.py,
# the bench's seed 0 and chunks it never uses; bench/README.md, Fidelity), against 0 at the same budget:
# top-1 / KL at ratio 0.15 0.955 / 0.0095 vs 0.945 / 0.0124 and 0.970 / 0.0064 vs 0.970 / 0.0093, at 0.05
# 0.925 / 0.0169 vs 0.895 / 0.0229 and 0.975 / 0.0132 vs 0.955 / 0.0178; 0.5 was the one exponent tried.
# Prompts there are 300-700 tokens: on 8k-token prompts the prior is untested.
DEFAULT_RECENCY = 0.5
# what the deviation selector compares at the check layer: K alone (CacheBlend), V alone, or both.
# V is the default: on the trained model (200 prompts, ratio 0.15, bench/README.md) it gave top-1 0.855
# and KL 0.049 where K gave 0.830 and 0.060 and both 0.840 and 0.057; a token's V is what it hands the
# question's attention, its K only how much attention it draws.
DEVIATIONS = ("v", "k", "kv")

KV = tuple[torch.Tensor, torch.Tensor]


def deviation(fresh: KV, cached: KV, covered: torch.Tensor, on: str, n_cov: int | None = None) -> torch.Tensor:
    """Per row: squared distance of the fresh K, V or both from the cached ones, in float32. With "kv"
    each term is divided by its mean over the covered rows, so K and V weigh the same
    whatever their scales (V's often differ from K's by an order of magnitude). `n_cov`: the number of
    covered rows, if the caller knows it: on a GPU the mean is then a masked sum over it, where boolean
    indexing would wait for the device to count the rows (the CPU keeps the indexed mean, bit for bit)."""
    terms = [(f.float() - c.float()).pow(2).sum(dim=(1, 2)) for f, c in zip(fresh, cached)]
    if on != "kv":
        return terms["kv".index(on)]
    if covered.device.type != "cpu":  # without n_cov the count stays a tensor on the device: still no wait
        count = n_cov if n_cov else covered.sum()
        return sum(t / (t.masked_fill(~covered, 0.0).sum() / count).clamp_min(1e-30) for t in terms)  # type: ignore[return-value]
    return sum(t / t[covered].mean().clamp_min(1e-30) for t in terms)  # type: ignore[return-value]


def query_attention(q: torch.Tensor, k: torch.Tensor, covered: torch.Tensor,
                    rows: torch.Tensor | None = None, after: int | None = None) -> torch.Tensor:
    """Per key row (all N): the attention the query rows after the last chunk (the question; at least
    the last row) pay it at this layer, averaged over their rows and heads, from their fresh q over the
    keys `k` [N, ...] under the position mask. `rows`: the prompt rows of q's rows (default: all N).
    `after`: the row after the last covered one, if the caller knows it (n - 1 when none is covered);
    given with `rows` (sorted), every row from `after` on must be among them (as the uncovered rows are
    among a blend's active rows): the question is then the last rows of q, a slice.
    Where the first answer token reads from, as far as this layer can tell."""
    n = k.shape[0]
    keys = torch.arange(n, device=k.device)
    if rows is not None and after is not None:  # the question: q's last rows (the last row at least)
        asking_rows = n - min(after, n - 1)
        return _attention_of(q[-asking_rows:].contiguous(), rows[-asking_rows:], k, keys)
    if after is None:
        after = int(keys[covered].max()) + 1 if bool(covered.any()) else n - 1
    if rows is None:  # q's rows are all N: the question is a slice (a boolean index would wait for a GPU)
        asking, tail_rows = q[min(after, n - 1):].contiguous(), keys[min(after, n - 1):]
    else:
        tail = rows >= min(after, n - 1)  # the last row is always among q's rows
        asking, tail_rows = q[tail], rows[tail]
    return _attention_of(asking, tail_rows, k, keys)


def _attention_of(asking: torch.Tensor, tail_rows: torch.Tensor, k: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query_attention's average: the rows `asking` (q at prompt rows `tail_rows`) over the keys `k`."""
    group = asking.shape[1] // k.shape[1]
    scores = torch.einsum("thd,nhd->htn", asking.float(), k.float().repeat_interleave(group, dim=1))
    scores = scores / asking.shape[2] ** 0.5
    scores.masked_fill_(keys[None, None, :] > tail_rows[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1))


@dataclass(frozen=True)
class Selection:
    """A blender's selection options (Blender's arguments of the same names, checked there)."""

    ratio: float
    selector: str = "deviation"
    deviation: str = DEFAULT_DEVIATION
    sink_tokens: int = 0
    query_weighted: bool = DEFAULT_QUERY_WEIGHTED
    recency: float = DEFAULT_RECENCY

    def select(self, fresh: KV, cached: KV, spans: Sequence[tuple[int, int]], n: int,
               forced: torch.Tensor | None = None, q: torch.Tensor | None = None, widen: float = 1.0) -> torch.Tensor:
        """Sorted row indices to recompute from the check layer on: the selected covered tokens (or the
        `forced` ones), every uncovered token, and the last token (its hidden state gives the logits).
        `fresh`, `cached`: the check layer's (K, V) of every row, computed here and read from the chunks;
        `spans`: the chunks' (start, end), sorted and disjoint; `q`: the check layer's fresh q of every
        row (for query weighting); `widen`: pick this many times the ratio's budget (gradual filtering)."""
        covered = torch.zeros(n, dtype=torch.bool, device=fresh[0].device)
        for s, e in spans:
            covered[s:e] = True
        keep = ~covered
        keep[-1] = True
        # counts from the spans (sorted, disjoint), not from the masks: reading a count off a GPU waits for it
        n_cov = sum(e - s for s, e in spans)
        budget = int(round(min(1.0, self.ratio * widen) * n_cov))
        if forced is not None:
            keep[forced] = True
        elif budget and self.selector == "deviation":
            sinks = min(self.sink_tokens, budget // max(1, len(spans)))  # inside the budget, never over it
            for s, _ in spans:
                keep[s:s + sinks] = True
            # covered rows kept so far: the sinks, and the last row if a chunk ends the prompt past its sinks
            last_kept = bool(spans) and spans[-1][1] == n and n - 1 >= spans[-1][0] + sinks
            left = budget - sum(min(sinks, e - s) for s, e in spans) - int(last_kept)
            if left > 0:
                dev = deviation(fresh, cached, covered, self.deviation, n_cov)
                if self.query_weighted and q is not None:  # first order: the answer's error is sum a_j dV_j
                    dev = dev.sqrt() * query_attention(q, fresh[0], covered, after=spans[-1][1])
                if self.recency:  # the later layers' attention of the answer favours what is near it
                    rows = torch.arange(n, device=dev.device)
                    dev = dev / (spans[-1][1] - rows).clamp_min(1).float().pow(self.recency)
                dev.masked_fill_(~covered | keep, -1.0)
                keep[torch.topk(dev, left).indices] = True
        elif budget:  # EPIC: the first tokens of each chunk, the same share of each
            for s, e in spans:
                keep[s:s + int(round(self.ratio * (e - s)))] = True
        return keep.nonzero().squeeze(1)

    def narrow(self, fresh: KV, cached: KV, q: torch.Tensor, active: torch.Tensor, covered: torch.Tensor,
               k_merged: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Gradual filtering, the layer after the check layer: indices into `active` to carry on — every
        uncovered row, the last row, and the ratio's share of the covered rows whose fresh K/V (`fresh`,
        `cached`: of the active rows) deviate most here. `k_merged`: this layer's K of every row, fresh
        where active (what the question attends over); `covered`: the rows of `spans`, the chunks'
        (start, end) as select took them. Counts come from the spans and shapes: no wait for a GPU."""
        n = int(covered.shape[0])
        cov = covered[active]
        keep = ~cov
        keep[-1] = True
        last_covered = bool(spans) and spans[-1][1] == n  # the last row, kept, is a covered one
        left = int(round(self.ratio * sum(e - s for s, e in spans))) - int(last_covered)
        if left > 0:
            dev = deviation(fresh, cached, cov, self.deviation)
            if self.query_weighted:
                dev = dev.sqrt() * query_attention(q, k_merged, covered, active, after=spans[-1][1])[active]
            dev.masked_fill_(~cov | keep, -1.0)
            # past the covered candidates topk takes rows already kept (-1): the same rows as a count would give
            keep[torch.topk(dev, min(left, int(active.shape[0]))).indices] = True
        return keep.nonzero().squeeze(1)
