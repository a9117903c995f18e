"""Which compressed caches decode together: a partition that minimises the memory read per decode step.

On CPU (and in GPU decode) a step is bound by memory traffic: every batch reads all the weights once, and every
row reads its layers' keys and values, padded to the widest row of its batch layer by layer. One batch of all jobs
pays the full cache's width on every row; one batch per job re-reads the weights per job. `partition` sorts jobs
by total width and splits that order where it pays, by dynamic programming over contiguous groups.
"""

from __future__ import annotations

import numpy as np


def partition(layer_widths: list[list[int]], batch_cost: float, max_rows: int, max_tokens: int) -> list[list[int]]:
    """Groups of job indices; `layer_widths[j][l]` is job j's kept tokens in layer l.

    Cost of a group = `batch_cost` (the weights' bytes, in units of one layer-token of K+V) + rows x the sum over
    layers of the widest row. Each group has <= max_rows rows and <= max_tokens padded layer-tokens.
    """
    widths = np.asarray(layer_widths, dtype=np.int64)
    n = len(widths)
    if n == 0:
        return []
    order = np.argsort(widths.sum(axis=1), kind="stable")
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        widest = np.zeros(widths.shape[1], dtype=np.int64)
        for start in range(end - 1, -1, -1):  # the group order[start:end], grown leftwards
            rows = end - start
            widest = np.maximum(widest, widths[order[start]])
            padded = rows * int(widest.sum())
            if rows > max_rows or (padded > max_tokens and rows > 1):
                break
            cost = best[start] + batch_cost + padded
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append([int(j) for j in order[cut[end] : end]])
        end = int(cut[end])
    return groups[::-1]
