"""The scheduler process: builds the ModelRunner and Scheduler, then serves ZMQ messages.

Loop: drain incoming messages (never blocking while there is work), run one scheduler step,
push the updates. A step that raises fails the requests it touched, not the process.

Under tensor parallelism there is one such process per rank: each joins the group first
(core/distributed/init.py), rank 0 reads ZMQ and broadcasts what it read, the others follow
(core/distributed/lockstep.py); only rank 0 pushes updates and control replies.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any, Optional

import zmq

from kvyard.scheduler.io_struct import (AbortReq, BatchTokenOut, ControlReply, ControlReq, SchedulerError,
                              TokenizedGenerateReq)
from kvyard.model_registry import ModelRegistry
from kvyard.scheduler.profiler import StepProfiler
from kvyard.scheduler.req import FinishReason
from kvyard.utils import exit_without_teardown

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50


def build_scheduler(args, tokenizer_factory=None, groups=None):
    """ModelRunner + Scheduler from ServerArgs (also used in-process by tests and benchmarks);
    ``groups``: this rank's kvyard.distributed.init.RankGroups (None: one rank)."""
    from kvyard.executor.backend_select import resolve_overlap_schedule
    from kvyard.executor.model_runner import ModelRunner
    from kvyard.grammar.manager import load_once, make_grammar_manager
    from kvyard.scheduler.scheduler import Scheduler
    from kvyard.scheduler.speculation import make_speculation

    from kvyard.distributed.init import ONE_RANK

    groups = groups or ONE_RANK
    if args.base_gpu_id and args.resolved_device() == "cuda" and not groups.world.enabled:
        import torch
        torch.cuda.set_device(args.base_gpu_id)   # "cuda" tensors of this process go there
    runner = ModelRunner(args.runner_config(), groups.tp, groups.pp, groups.world)
    mc = runner.model_config
    disable = True if groups.pp.enabled else args.disable_overlap_schedule   # a stage waits on its neighbours
    overlap = resolve_overlap_schedule(disable, runner.device,
                                       is_generation=getattr(runner.model, "is_generation", True))
    config = args.scheduler_config(runner.max_running_requests, mc.context_length, overlap)
    tokenizer_factory = load_once(tokenizer_factory)  # shared by the stop checker and the grammars
    if args.delete_ckpt_after_loading and tokenizer_factory is not None:
        tokenizer_factory()   # now: the API process deletes the checkpoint once every process is ready
    grammar = make_grammar_manager(args.grammar_backend, mc.vocab_size, mc.eos_token_ids, tokenizer_factory,
                                   args.constrained_json_whitespace_pattern)
    if grammar is not None and groups.world.enabled:
        grammar.lockstep = True   # ranks must agree on when a request's grammar is ready
    speculation = make_speculation(args.speculative_config(), draft_context(args, runner))
    if speculation is not None:   # the verify step: 1 + k tokens per request, captured like decode
        runner.enable_extend_graphs(speculation.config.num_draft_tokens)
    return Scheduler(config, runner, mc.eos_token_ids, tokenizer_factory, grammar=grammar, speculation=speculation)


def draft_context(args, runner):
    """What a speculative algorithm may know of the target (core/speculative.py)."""
    from dataclasses import replace

    from kvyard.executor.draft_head import DraftHeadRunner
    from kvyard.executor.draft_model import DraftModel
    from kvyard.executor.model_runner import ModelRunner
    from kvyard.speculative import DraftContext

    def make_draft_model(model_path: str, revision=None) -> DraftModel:
        load_format = args.speculative_draft_load_format or ("dummy" if args.load_format == "dummy" else "auto")
        draft_args = replace(args, model_path=model_path, revision=revision, quantization=None, load_format=load_format,
                             json_model_override_args="", speculative_algorithm=None,
                             speculative_draft_model_path=None, page_size=1, enable_torch_compile=False,
                             enable_lora=False, lora_paths=None,
                             max_total_tokens=runner.max_total_tokens, max_running_requests=runner.max_running_requests,
                             context_length=runner.model_config.context_length)
        return DraftModel(ModelRunner(draft_args.runner_config()))

    def make_draft_head(head, max_steps: int, topk: int = 1) -> DraftHeadRunner:
        return DraftHeadRunner(head, target=runner, max_steps=max_steps, topk=topk)

    def target_modules():
        if not hasattr(runner.model, "input_embeddings"):
            raise ValueError(f"speculative_algorithm: the model {mc.architectures[0]} does not share its "
                             "embedding with a draft head (kvyard.model_base)")
        return runner.model.input_embeddings(), runner.model.compute_logits

    mc = runner.model_config
    return DraftContext(vocab_size=mc.vocab_size, eos_token_ids=tuple(mc.eos_token_ids), device=runner.device,
                        dtype=runner.dtype, max_running_requests=runner.max_running_requests,
                        context_length=mc.context_length, make_draft_model=make_draft_model,
                        target_config=mc.hf_config, target_modules=target_modules,
                        enable_hidden_capture=runner.enable_hidden_capture, make_draft_head=make_draft_head)


def run_scheduler_process(args, in_addr: str, out_addr: str, registry_snapshot: dict,
                          ready_conn, tokenizer_factory=None, parent_link=None,
                          parallel=None, local_rank: int = 0) -> None:
    """``parallel``: a kvyard.distributed.ParallelConfig of more than one rank (None: one rank);
    ``local_rank``: this process's rank on its node. Ranks > 0 ignore the ZMQ addresses."""
    rank = parallel.global_rank(local_rank) if parallel else 0
    name = f"kvyard scheduler rank{rank}" if parallel else "kvyard scheduler"
    logging.basicConfig(level=args.log_level.upper(), format=f"[{name}] %(levelname)s %(message)s")
    if parent_link is not None:
        from kvyard.scheduler.parent_watch import watch_parent
        watch_parent(parent_link)  # exit (and clean up) when the API process dies
    ModelRegistry.restore(registry_snapshot)
    try:
        groups, args = _join_group(args, parallel, local_rank)
        scheduler = build_scheduler(args, tokenizer_factory, groups)
    except Exception as exc:
        ready_conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()})
        return
    ready_conn.send({"ok": True, "info": {**scheduler_info(scheduler), "tp_size": args.tp_size,
                                          "pp_size": args.pp_size}})
    ready_conn.close()
    inbox, outbox = _sockets(in_addr, out_addr, groups.world)
    SchedulerLoop(scheduler, inbox, outbox, args.watchdog_timeout, groups.world).run()


def _join_group(args, parallel, local_rank: int):
    """(this rank's RankGroups, args): every rank gets rank 0's random seed when none was
    given, so the ranks' schedulers and samplers draw the same numbers."""
    from dataclasses import replace

    from kvyard.distributed.collectives import broadcast_object
    from kvyard.distributed.init import ONE_RANK, init_parallel

    if parallel is None:
        return ONE_RANK, args
    groups = init_parallel(parallel, local_rank, args.base_gpu_id + local_rank * args.gpu_id_step)
    seed = broadcast_object(args.random_seed if args.random_seed is not None
                            else int.from_bytes(os.urandom(4), "little") >> 1, groups.world)
    return groups, replace(args, random_seed=seed)


def _sockets(in_addr: str, out_addr: str, world):
    """(inbox, outbox) of this rank (core/distributed/lockstep.py)."""
    from kvyard.distributed.lockstep import FollowerInbox, LeaderInbox, NullOutbox, ZmqInbox

    if world.rank > 0:
        return FollowerInbox(world), NullOutbox()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(in_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(out_addr)
    inbox = ZmqInbox(pull)
    return (LeaderInbox(inbox, world) if world.enabled else inbox), outbox


def scheduler_info(scheduler) -> dict[str, Any]:
    runner = scheduler.runner
    mc = runner.model_config
    return {"max_total_num_tokens": runner.max_total_tokens,
            "max_running_requests": runner.max_running_requests,
            "context_length": mc.context_length, "vocab_size": mc.vocab_size,
            "attention_backend": runner.attn_backend_name, "dtype": str(runner.dtype).replace("torch.", ""),
            "quantization": runner.quantization, "device": runner.device, "pid": os.getpid(),
            "page_size": runner.config.page_size, "overlap_schedule": scheduler.config.enable_overlap,
            "is_embedding": not getattr(runner.model, "is_generation", True),
            "lora_adapters": runner.lora.describe() if runner.lora is not None else None}


class SchedulerLoop:
    def __init__(self, scheduler, inbox, outbox, watchdog_timeout: float = 300.0, tp=None):
        """inbox: ``wait(ms)`` / ``drain() -> list`` (kvyard.distributed.lockstep); outbox:
        ``send_pyobj``."""
        from kvyard.distributed import SINGLE

        self.tp = tp or SINGLE
        self.scheduler = scheduler
        self.inbox = inbox
        self.outbox = outbox
        self.was_busy = False
        self.watchdog_timeout = watchdog_timeout
        self.step_started: Optional[float] = None
        self.profiler = StepProfiler()
        # a continuous decode run streams each sub-step's tokens and stops when a message waits;
        # under tensor parallelism (no ``pending``: the ranks must agree) it runs its full length
        scheduler.emit = lambda updates: self.outbox.send_pyobj(BatchTokenOut(updates))
        scheduler.inbox_pending = getattr(inbox, "pending", None)

    def run(self) -> None:
        threading.Thread(target=self._watchdog, name="kvyard-watchdog", daemon=True).start()
        while True:
            busy = self.scheduler.has_work()
            if not busy:
                if self.was_busy:
                    self._idle_check()
                self.inbox.wait(IDLE_POLL_MS)
            self.was_busy = busy
            updates = self._drain()
            self.step_started = time.monotonic()
            try:
                updates += self.scheduler.step()
            except Exception as exc:  # fail what was running, keep serving
                logger.error("scheduler step failed:\n%s", traceback.format_exc())
                updates += self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
            self.step_started = None
            if busy and self.profiler.active:
                self.profiler.after_step()
            if updates:
                self.outbox.send_pyobj(BatchTokenOut(updates))

    def _watchdog(self) -> None:
        """A step stuck past --watchdog-timeout ends the process; the API side then fails
        pending requests instead of hanging forever."""
        while True:
            time.sleep(min(5.0, self.watchdog_timeout / 4))
            started = self.step_started
            if started is not None and time.monotonic() - started > self.watchdog_timeout:
                logger.error("a scheduler step exceeded --watchdog-timeout (%.0f s); exiting", self.watchdog_timeout)
                os._exit(1)

    def _drain(self) -> list:
        updates = []
        for msg in self.inbox.drain():
            if isinstance(msg, TokenizedGenerateReq):
                rejected = self.scheduler.add_request(msg)
                if rejected:
                    updates.append(rejected)
            elif isinstance(msg, AbortReq):
                updates += self.scheduler.abort(msg.rid)
            elif isinstance(msg, ControlReq):
                self.outbox.send_pyobj(self._control(msg))
            elif msg == "shutdown":
                exit_without_teardown(0)   # nothing is pending: the API side closed its sockets
        return updates

    def _control(self, msg: ControlReq) -> ControlReply:
        s = self.scheduler
        try:
            if msg.op == "flush_cache":
                ok = s.flush_cache()
                return ControlReply(msg.id, ok, message="" if ok else "requests are running; not flushed")
            if msg.op == "get_info":
                return ControlReply(msg.id, True, {**scheduler_info(s), **s.load_info()})
            if msg.op == "start_profile":
                return ControlReply(msg.id, True, {"output_dir": self.profiler.start(**msg.args)})
            if msg.op == "stop_profile":
                return ControlReply(msg.id, True, {"trace": self.profiler.stop()})
            if msg.op == "check_integrity":
                self._check_integrity_everywhere()
                return ControlReply(msg.id, True)
            if msg.op == "update_weights":
                finished = s.finish_inflight()   # the worker must be idle while the model changes
                if finished:
                    self.outbox.send_pyobj(BatchTokenOut(finished))
                s.runner.update_weights(msg.args["model_path"], msg.args.get("load_format"))
                s.cache.reset() if not s.has_work() else None
                return ControlReply(msg.id, True, message="weights updated")
            if msg.op in ("load_lora", "unload_lora"):
                return self._lora_control(msg)
            return ControlReply(msg.id, False, message=f"unknown control op {msg.op!r}")
        except Exception as exc:
            return ControlReply(msg.id, False, message=f"{type(exc).__name__}: {exc}")

    def _check_integrity_everywhere(self) -> None:
        """The KV integrity check on every rank; AssertionError naming the ranks that fail."""
        from kvyard.distributed.collectives import gather_objects

        try:
            self.scheduler.check_integrity()
            problem = None
        except AssertionError as exc:
            problem = f"rank {self.tp.rank}: {exc}" if self.tp.enabled else str(exc)
        problems = [p for p in gather_objects(problem, self.tp) if p]
        if problems:
            raise AssertionError("; ".join(problems))
    def _lora_control(self, msg: ControlReq) -> ControlReply:
        """load_lora {name, path} / unload_lora {name}; an adapter in use is not unloaded (the
        API process waits for its requests first)."""
        s, name = self.scheduler, msg.args["name"]
        lora = s.runner.lora
        if lora is None:
            return ControlReply(msg.id, False, message="LoRA serving is off (start the server with --enable-lora)")
        if msg.op == "load_lora":
            from kvyard.lora.config import LoRAError
            try:
                lora.load(name, msg.args["path"])
            except LoRAError as exc:
                return ControlReply(msg.id, False, message=str(exc))
            return ControlReply(msg.id, True, {"adapters": lora.describe()}, message=f"adapter {name!r} loaded")
        users = s.lora_users(name)
        if users:
            return ControlReply(msg.id, False, message=f"lora_name: adapter {name!r} is used by {users} requests")
        lora.unload(name)
        return ControlReply(msg.id, True, {"adapters": lora.describe()}, message=f"adapter {name!r} unloaded")

    def _fail_all(self, message: str) -> list:
        updates = self.scheduler.abort("")
        for u in updates:
            u.finished_reason = FinishReason("abort", message=message).to_dict()
        return updates

    def _idle_check(self) -> None:
        try:
            self.scheduler.check_integrity()
        except AssertionError as exc:
            logger.error("KV integrity check failed while idle: %s", exc)
