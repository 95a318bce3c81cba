"""Speculative decoding: the `speculative_algorithms` plugin kind and its contract.

An algorithm proposes draft tokens for the running requests of a decode step; the core verifies
them all in one target forward and keeps what the target itself would have produced
(core/scheduler/speculation.py). Lifecycle of one algorithm instance, in the scheduler process:

    algo = Algorithm(config, context)      # once, after the target model is loaded
    drafts = algo.propose(requests)        # each decode step: per request a chain (list of ids, maybe
                                           # empty), a DraftTree, or a DeviceChain (tokens still
                                           # on the device: the verify batch takes them there)
    algo.observe(steps)                    # after every target step, when the algorithm asked the
                                           # context for the target's hidden states (draft heads)
    algo.accepted(rid, tokens)             # after verification: the tokens the request gained
    algo.release(rid)                      # the request finished, was aborted or retracted
    algo.close()

Invariants the core keeps, whatever the algorithm proposes:
  - verification is exact: at every node of a draft (a chain is a tree whose nodes each have one
    child) the target samples its own token with the sampler, seed and position a plain decode
    step would use after that node's path (the sampler's draw depends only on (logits, seed,
    position): core/sampling/sampler.py). Acceptance walks from the root: it moves to the child
    whose token equals the target's token at the current node, and stops where no child does;
    the target's token there ends the step (the bonus token at a leaf). Children of a node carry
    distinct tokens, so the walk is unique. Output is the non-speculative output token for token,
    greedy or sampled, so its distribution is the target's. A bad proposal only costs speed.
  - the KV slots of rejected tokens are freed in the same step; the prefix cache only ever
    receives KV of accepted tokens.
  - a draft is cut to what the request may still generate (depth <= max_new_tokens left, context
    length) and to ``num_draft_tokens - 1`` nodes; requests with a grammar, penalties or min_new_tokens are
    decoded without drafts (their sampling state depends on every previous token on the host).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence


@dataclass(frozen=True)
class SpeculativeConfig:
    algorithm: str
    num_steps: int = 3                        # draft depth
    eagle_topk: int = 1                       # candidates per step (1: a chain)
    num_draft_tokens: int = 4                 # tokens verified per request, the request's own last token included
    draft_model_path: Optional[str] = None
    draft_model_revision: Optional[str] = None
    accept_threshold_single: float = 1.0
    accept_threshold_acc: float = 1.0
    token_map: Optional[str] = None
    ngram_min_match_window_size: int = 1
    ngram_max_match_window_size: int = 12
    ngram_min_bfs_breadth: int = 1
    ngram_max_bfs_breadth: int = 10
    ngram_match_type: str = "BFS"
    ngram_branch_length: int = 18
    ngram_capacity: int = 10_000_000

    @property
    def max_draft_len(self) -> int:
        """Draft nodes per request and step (a chain's length, or a tree's size)."""
        return self.num_draft_tokens - 1

    @property
    def tree(self) -> bool:
        """Whether drafts may branch (the verify forward then needs a tree attention mask)."""
        return self.eagle_topk > 1 or self.num_draft_tokens > self.num_steps + 1


@dataclass(frozen=True)
class DraftContext:
    """What an algorithm may know of the target: never the runner itself."""
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: Any                                 # torch.dtype of the target
    max_running_requests: int
    context_length: int
    # make_draft_model(model_path, revision) -> a DraftModel (core/executor/draft_model.py): another
    # model with its own weights and KV pool; ``propose(inputs, depth)`` drafts chains for
    # DraftInputs, ``release(rid)`` frees a request's draft KV, ``close()`` frees everything
    make_draft_model: Optional[Callable[..., Any]] = None
    # draft heads (EAGLE-style): the target's HF config; ``target_modules()`` -> (its token
    # embedding module, its compute_logits) to share; ``enable_hidden_capture(layers)`` makes every
    # target step report the hidden states of those layers (FINAL_HIDDEN = -1: the final normed
    # state) through ``observe``; ``make_draft_head(head, max_steps, topk=1)`` -> a DraftHeadRunner
    # (core/executor/draft_head.py) running a DraftHead module with its own KV (topk > 1: it also
    # expands top-k draft trees, ``propose_tree``)
    target_config: Any = None
    target_modules: Optional[Callable[[], tuple[Any, Any]]] = None
    enable_hidden_capture: Optional[Callable[[tuple[int, ...]], None]] = None
    make_draft_head: Optional[Callable[..., Any]] = None


@dataclass(frozen=True)
class DraftInput:
    """One running request as a drafter sees it."""
    rid: str
    token_ids: Sequence[int]                  # prompt + output so far (the last one has no KV yet)
    max_draft_len: int                        # at most this many draft nodes for this request now
    seed: int                                 # the request's sampling seed
    sampling_params: Any = None               # its normalized SamplingParams (temperature, top_k, ...)
    kv_row: int = -1                          # its row of the target's req_to_token table (draft heads)
    max_depth: Optional[int] = None           # trees: deepest node allowed (None: max_draft_len)

    @property
    def depth_limit(self) -> int:
        return self.max_draft_len if self.max_depth is None else min(self.max_depth, self.max_draft_len)


@dataclass(frozen=True)
class DraftTree:
    """A request's draft tree. Node i is ``tokens[i]``, a child of node ``parents[i]`` (-1: of the
    root, the request's last token, whose KV the verify step writes too). Invariants: a parent
    precedes its children (parents[i] < i), and the children of one node carry distinct tokens.
    In the verify forward node i is row i + 1 at position kv_len + depth(i) (the root: row 0 at
    kv_len) and sees the prefix, the root and its own ancestors only (``mask``)."""
    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("DraftTree: tokens and parents differ in length")
        seen = set()
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if not -1 <= p < i:
                raise ValueError(f"DraftTree: node {i}'s parent {p} does not precede it")
            if (p, t) in seen:
                raise ValueError(f"DraftTree: node {p} has two children with token {t}")
            seen.add((p, t))

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> "DraftTree":
        tokens = tuple(int(t) for t in tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """[n] depth of each node (children of the root: 1)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def mask(self) -> list[list[bool]]:
        """[n + 1][n + 1] over the verify rows (row 0 the root): row r sees row c iff c is r or
        one of its ancestors."""
        n = len(self.tokens)
        rows = [[c == 0 for c in range(n + 1)] for _ in range(n + 1)]
        rows[0][0] = True
        for i, p in enumerate(self.parents):
            rows[i + 1] = list(rows[p + 1])
            rows[i + 1][i + 1] = True
        return rows

    def accept(self, targets: Sequence[int]) -> list[int]:
        """The accepted path as verify rows [0, r1, .., rm] given the target's token at every row
        (targets [n + 1]): from the root, move to the child whose token equals the target's
        token at the current row. The request gains ``targets[r]`` for each r on the path."""
        children: dict[int, dict[int, int]] = {}
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            children.setdefault(p + 1, {})[t] = i + 1
        path = [0]
        while True:
            nxt = children.get(path[-1], {}).get(int(targets[path[-1]]))
            if nxt is None:
                return path
            path.append(nxt)

    def first_branch(self) -> "DraftTree":
        """The chain of first children from the root (what a server without trees verifies)."""
        tokens, last = [], -1
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if p == last:
                tokens.append(t)
                last = i
        return DraftTree.chain(tokens)

    def pruned(self, max_nodes: int, max_depth: int) -> "DraftTree":
        """The first nodes (in order) of depth <= max_depth whose parent is kept, at most max_nodes."""
        keep: dict[int, int] = {}          # old index -> new index
        tokens, parents = [], []
        for i, (t, p, d) in enumerate(zip(self.tokens, self.parents, self.depths())):
            if len(tokens) >= max_nodes:
                break
            if d > max_depth or (p >= 0 and p not in keep):
                continue
            keep[i] = len(tokens)
            tokens.append(t)
            parents.append(-1 if p < 0 else keep[p])
        return DraftTree(tuple(tokens), tuple(parents))


    def device_tokens(self) -> Optional[tuple["DeviceDrafts", int]]:
        """(drafts, row) when the tokens are still on the device (a DeviceChain), else None."""
        return None


class DeviceDrafts:
    """Draft chains of several requests whose tokens are still on the device, so the verify
    batch can be built and launched before they reach the host (its input ids are filled on
    the device: ``tensor`` row k holds chain k, left-aligned). The host copy starts at once
    (into pinned memory, without waiting on CUDA) and is read on first use of ``host()``: after
    the verify step's own sync, so a cycle syncs once."""

    def __init__(self, tensor):
        import torch

        self.tensor = tensor                                   # int64 [L, D] on the device
        self._done = None
        if tensor.is_cuda:
            self._copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._copy.copy_(tensor, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._copy = tensor
        self._rows: Optional[list[list[int]]] = None

    def host(self) -> list[list[int]]:
        """[L][D] the drafts on the host (waits for the copy the first time)."""
        if self._rows is None:
            if self._done is not None:
                self._done.synchronize()
            self._rows = self._copy.tolist()
        return self._rows

    def chain(self, row: int, length: int) -> "DeviceChain":
        return DeviceChain(self, row, length)


class DeviceChain(DraftTree):
    """A chain of ``length`` drafts, row ``row`` of a DeviceDrafts: a DraftTree whose length and
    shape are known on the host and whose tokens reach the host only when read (acceptance,
    after the verify)."""

    def __init__(self, drafts: DeviceDrafts, row: int, length: int):   # no __post_init__: a chain is valid
        object.__setattr__(self, "_drafts", drafts)
        object.__setattr__(self, "_row", row)
        object.__setattr__(self, "_length", length)
        object.__setattr__(self, "parents", tuple(range(-1, length - 1)))

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._drafts.host()[self._row][:self._length])

    def __len__(self) -> int:
        return self._length

    @property
    def is_chain(self) -> bool:
        return True

    def depths(self) -> list[int]:
        return list(range(1, self._length + 1))

    def first_branch(self) -> "DraftTree":
        return self

    def pruned(self, max_nodes: int, max_depth: int) -> "DraftTree":
        n = max(0, min(self._length, max_nodes, max_depth))
        return self if n == self._length else DeviceChain(self._drafts, self._row, n)

    def device_tokens(self) -> Optional[tuple[DeviceDrafts, int]]:
        return self._drafts, self._row


def as_tree(draft) -> DraftTree:
    """A proposal (a chain as a sequence of ids, or a DraftTree: a DeviceChain too) as a DraftTree."""
    return draft if isinstance(draft, DraftTree) else DraftTree.chain(draft)


@dataclass(frozen=True)
class HiddenStep:
    """What one target step computed for one request, given once the token after each of its rows
    is known (a draft head's entry at position p reads the hidden state at p and token p + 1)."""
    rid: str
    kv_row: int                               # the request's row of the target's req_to_token table
    start: int                                # position of the first row
    next_tokens: Sequence[int]                # [n] the token that follows each row's position
    slots: Any                                # int64 [n] the target's KV slots of positions start .. start+n-1
    hidden: Any                               # [n, D] the target's hidden states there (device)


class DraftHead:
    """What a draft-head module (torch nn.Module) provides to core/executor/draft_head.py:

      forward(input_ids [T], positions [T], hidden [T, D_in], fb) -> (feature [T, H], out [T, H])
          hidden: the target's captured states (first entry after a target step) or the head's
          own features (chain steps); feature feeds the next chain step, out the LM head.
      compute_logits(out [N, H]) -> float32 [N, V_draft]
      kv_layout() -> kvyard.kv_layout.KVLayout of the head's own layers
      num_heads: int                           query heads of its attention
      feature_size: int                        H: the width of ``feature`` (optional; without it
                                               the chain steps run eagerly, no CUDA graphs)
      draft_to_target: None or int64 [V_draft] target token id of each draft-vocabulary id
    """


DRAFT_MODEL_ALGORITHMS = ("STANDALONE", "EAGLE", "EAGLE3")


def config_from_args(args) -> Optional[SpeculativeConfig]:
    """SpeculativeConfig from ServerArgs' ``speculative_*`` fields; None when no algorithm is set.
    Raises ValueError naming the flag for what cannot work."""
    algo = args.speculative_algorithm
    if algo is None:
        if args.speculative_draft_model_path:
            raise ValueError("speculative_draft_model_path needs --speculative-algorithm (e.g. STANDALONE)")
        return None
    if args.is_embedding:
        raise ValueError("speculative_algorithm: speculative decoding is for generation models, not --is-embedding")
    topk = 1 if args.speculative_eagle_topk is None else args.speculative_eagle_topk
    if topk < 1:
        raise ValueError(f"speculative_eagle_topk must be >= 1, got {topk}")
    if topk > 1 and algo not in ("EAGLE", "EAGLE3"):
        raise ValueError(f"speculative_eagle_topk {topk}: top-k tree drafts are for EAGLE and EAGLE3, "
                         f"not {algo} (NGRAM trees: --speculative-num-draft-tokens above num_steps + 1)")
    for name in ("speculative_accept_threshold_single", "speculative_accept_threshold_acc"):
        if getattr(args, name) != 1.0:
            raise ValueError(f"{name}: only 1.0 is supported (verification is exact)")
    if args.speculative_token_map and algo not in ("EAGLE", "EAGLE3"):
        raise ValueError(f"speculative_token_map is for EAGLE-3 draft heads, not {algo}")
    if algo in DRAFT_MODEL_ALGORITHMS and not args.speculative_draft_model_path:
        raise ValueError(f"speculative_draft_model_path is required with --speculative-algorithm {algo}")
    if algo not in DRAFT_MODEL_ALGORITHMS and args.speculative_draft_model_path:
        raise ValueError(f"speculative_draft_model_path: {algo} uses no draft model")
    steps, tokens = args.speculative_num_steps, args.speculative_num_draft_tokens
    if steps is None:
        steps = tokens - 1 if tokens is not None else 3
    if tokens is None:
        tokens = steps + 1
    if steps < 1:
        raise ValueError(f"speculative_num_steps must be >= 1, got {steps}")
    _check_draft_tokens(algo, steps, tokens, topk, args)
    lo, hi = args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size
    if not 1 <= lo <= hi:
        raise ValueError(f"speculative_ngram_min_match_window_size ({lo}) must be >= 1 and <= "
                         f"speculative_ngram_max_match_window_size ({hi})")
    for name in ("speculative_ngram_branch_length", "speculative_ngram_capacity"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    return SpeculativeConfig(
        algorithm=algo, num_steps=steps, eagle_topk=topk, num_draft_tokens=tokens,
        draft_model_path=args.speculative_draft_model_path,
        draft_model_revision=args.speculative_draft_model_revision,
        token_map=args.speculative_token_map,
        ngram_min_match_window_size=lo, ngram_max_match_window_size=hi,
        ngram_min_bfs_breadth=args.speculative_ngram_min_bfs_breadth,
        ngram_max_bfs_breadth=args.speculative_ngram_max_bfs_breadth,
        ngram_match_type=args.speculative_ngram_match_type,
        ngram_branch_length=args.speculative_ngram_branch_length,
        ngram_capacity=args.speculative_ngram_capacity)


def _check_draft_tokens(algo: str, steps: int, tokens: int, topk: int, args) -> None:
    """num_draft_tokens against what the algorithm's drafts can hold (SGLang's rules): a chain
    has num_steps + 1 rows; an EAGLE tree at most topk * num_steps + 1; an NGRAM trie (more rows
    than a chain asks for one) at most max_bfs_breadth * num_steps + 1."""
    lo, hi = args.speculative_ngram_min_bfs_breadth, args.speculative_ngram_max_bfs_breadth
    if not 1 <= lo <= hi:
        raise ValueError(f"speculative_ngram_min_bfs_breadth ({lo}) must be >= 1 and <= "
                         f"speculative_ngram_max_bfs_breadth ({hi})")
    if tokens < 2:
        raise ValueError(f"speculative_num_draft_tokens must be >= 2 (the last token and a draft), got {tokens}")
    if algo in ("EAGLE", "EAGLE3") and topk > 1:
        cap, why = topk * steps + 1, f"speculative_eagle_topk * speculative_num_steps + 1 ({topk} * {steps} + 1)"
    elif algo == "NGRAM" and tokens > steps + 1:
        cap, why = hi * steps + 1, f"speculative_ngram_max_bfs_breadth * speculative_num_steps + 1 ({hi} * {steps} + 1)"
    else:
        if tokens != steps + 1:
            raise ValueError(f"speculative_num_draft_tokens ({tokens}) must be speculative_num_steps + 1 "
                             f"({steps + 1}) for chain drafts")
        return
    if tokens > cap:
        raise ValueError(f"speculative_num_draft_tokens ({tokens}) must be <= {why} = {cap}")


def spec_features(args) -> frozenset:
    """The attention features (kvyard.attention.LAYER_FEATURES) speculation needs under these
    server args: "spec_tree" when drafts may branch (the verify extend takes a tree mask)."""
    if getattr(args, "speculative_algorithm", None) is None:
        return frozenset()
    config = config_from_args(args)
    return frozenset({"spec_tree"}) if config is not None and config.tree else frozenset()


class SpeculativeAlgorithm(ABC):
    name: ClassVar[str] = ""

    def __init__(self, config: SpeculativeConfig, context: DraftContext):
        self.config = config
        self.context = context

    @abstractmethod
    def propose(self, requests: Sequence[DraftInput]) -> list:
        """Per request a chain of draft token ids or a DraftTree (at most ``max_draft_len`` nodes,
        none deeper than ``depth_limit``; may be empty). Trees only when ``config.tree``."""

    def observe(self, steps: Sequence[HiddenStep]) -> None:
        """The target's hidden states of a finished step (only after enable_hidden_capture)."""

    def accepted(self, rid: str, tokens: Sequence[int]) -> None:
        """The tokens ``rid`` gained this step (accepted drafts and the target's own token)."""

    def release(self, rid: str) -> None:
        """``rid`` left the running batch (finished, aborted, retracted)."""

    def close(self) -> None:
        """Frees what the algorithm holds."""
