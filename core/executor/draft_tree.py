"""Top-k draft trees of a draft head, the EAGLE-2 way (used by DraftHeadRunner.propose_tree).

Per request, with k = topk and the head's log-probabilities log q over the target vocabulary:

  depth 1   the k most likely tokens after the request's tail entry become candidates and beams;
            a candidate's score is the sum of log q along its path (its path's draft probability).
  depth d   every beam is run through the head once (DraftHeadRunner.beam_step: its own KV row
            of prefix + ancestors); each beam's k most likely children become candidates
            (k * k per request), and the k best of them by score become the next beams.
  select    the ``nodes`` best candidates by score whose parent is selected too (a child never
            scores above its parent, so this is the best-score subtree), as a DraftTree with
            parents before children.

Sampled requests: at every expansion the child the request's own coupled draw picks (the token
the target's verify row draws too when the head agrees with the target; DraftHeadRunner
.favour_draws) scores as if certain, so the chain a sampled request would draft is always in its
tree and the other nodes branch off it by probability. Greedy requests rank by probability only.

Invariants: siblings carry distinct tokens (each comes from one top-k of one distribution);
candidates off the draft vocabulary (score -inf) are dropped; no node is deeper than the
request's depth limit. The draft only decides speed: the target verifies every node
(core/scheduler/speculation.py), greedy or sampled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvyard.speculative import DraftTree


@dataclass
class Candidate:
    score: float          # sum of the draft's log-probabilities along the path
    depth: int            # 1 for children of the root
    parent: int           # index of the parent candidate, -1 for the root
    token: int


def select_tree(cands: Sequence[Candidate], nodes: int) -> DraftTree:
    """The best ``nodes`` candidates by score whose parents are selected, as a DraftTree."""
    order = sorted(range(len(cands)), key=lambda c: (-cands[c].score, cands[c].depth, c))
    chosen: set[int] = set()
    for c in order:
        if len(chosen) >= nodes:
            break
        if cands[c].score == float("-inf"):
            break
        if cands[c].parent < 0 or cands[c].parent in chosen:
            chosen.add(c)
    ranked = sorted(chosen, key=lambda c: (cands[c].depth, c))      # parents before children
    index = {c: i for i, c in enumerate(ranked)}
    return DraftTree(tuple(cands[c].token for c in ranked),
                     tuple(-1 if cands[c].parent < 0 else index[cands[c].parent] for c in ranked))


def expand_tree(runner, inputs: Sequence, depth: Sequence[int], nodes: Sequence[int]) -> list[DraftTree]:
    """A DraftTree per request (``runner`` a DraftHeadRunner with topk k; depth/nodes [B] the
    limits per request; empty trees where the head has no entry at the request's tail)."""
    live = [i for i, (inp, d) in enumerate(zip(inputs, depth)) if d > 0 and nodes[i] > 0 and runner._ready(inp)]
    cands: dict[int, list[Candidate]] = {i: [] for i in live}
    if live:
        _expand(runner, inputs, depth, live, cands)
    return [select_tree(cands[i], nodes[i]) if i in cands else DraftTree((), ()) for i in range(len(inputs))]


def _expand(runner, inputs: Sequence, depth: Sequence[int], live: list[int], cands: dict) -> None:
    """Fills cands[i] for the requests ``live``; per-beam state is kept aligned with ``live``:
    score/token [B, k] of the beams, parent_feature [B * k, H], beams [B][k] candidate indices,
    paths [B][k] scratch slots of the beams' ancestors."""
    k = runner.topk
    feature, logp = runner.tree_roots([inputs[i] for i in live])
    score, token = runner.favour_draws([inputs[i] for i in live], logp, 1).topk(k, dim=-1)   # [B, k]
    beams = [_add(cands[i], s, t, [-1] * k, 1) for i, s, t in zip(live, score.tolist(), token.tolist())]
    parent_feature = feature.repeat_interleave(k, dim=0)                  # [B * k, H]
    paths: list[list[list[int]]] = [[[] for _ in range(k)] for _ in live]
    for d in range(2, max(depth[i] for i in live) + 1):
        keep = [b for b, i in enumerate(live) if depth[i] >= d]
        if len(keep) < len(live):
            rows = torch.tensor([b * k + j for b in keep for j in range(k)], device=parent_feature.device)
            live, beams, paths = [live[b] for b in keep], [beams[b] for b in keep], [paths[b] for b in keep]
            score, token, parent_feature = score[keep], token[keep], parent_feature[rows]
        feat, child_logp = runner.beam_step([inputs[i] for i in live], token.flatten(), parent_feature, paths, d - 1)
        rows = [inputs[i] for i in live for _ in range(k)]
        child_score, child_token = runner.favour_draws(rows, child_logp, d).topk(k, dim=-1)   # [B * k, k]
        total = (score.reshape(-1, 1) + child_score).view(len(live), k * k)  # child j of beam j // k
        tokens = child_token.view(len(live), k * k)
        new = [_add(cands[i], s, t, [beams[b][j // k] for j in range(k * k)], d)
               for b, (i, s, t) in enumerate(zip(live, total.tolist(), tokens.tolist()))]
        score, best = total.topk(k, dim=-1)                                # [B, k] the next beams
        token = tokens.gather(1, best)
        best_l = best.tolist()
        beams = [[new[b][j] for j in best_l[b]] for b in range(len(live))]
        paths = [[paths[b][j // k] for j in best_l[b]] for b in range(len(live))]
        rows = torch.tensor([b * k + j // k for b in range(len(live)) for j in best_l[b]], device=feat.device)
        parent_feature = feat[rows]


def _add(cands: list[Candidate], scores: list[float], tokens: list[int], parents: list[int], depth: int) -> list[int]:
    """Appends one candidate per (score, token, parent); returns their indices."""
    start = len(cands)
    cands.extend(Candidate(s, depth, p, t) for s, t, p in zip(scores, tokens, parents))
    return list(range(start, len(cands)))
