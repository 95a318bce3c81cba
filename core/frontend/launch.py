"""Starts the scheduler process and builds the API-side TokenizerManager (Engine and server share it).

Process layout: one scheduler process, or ``--dp-size`` replicas, or ``--tp-size x --pp-size``
ranks (this node's share of them with ``--nnodes``; rank 0 is the one the API process talks to). All load in
parallel; start-up waits for every process to report ready and fails at the first error.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Optional

from kvyard.diffusion.detect import resolve_model_type
from kvyard.model_registry import ModelRegistry
from kvyard.scheduler.parent_watch import ParentLink, make_ipc_dir, remove_ipc_dir
from kvyard.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class EngineProcess:
    """The scheduler process(es): one, ``--dp-size`` replicas (addresses in replica order), or
    this node's ``--tp-size`` ranks (one address pair: rank 0's)."""
    args: ServerArgs
    processes: list
    info: dict
    send_addrs: list[str]
    recv_addrs: list[str]
    tokenizer: Any
    ipc_dir: Optional[str] = None

    def is_alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.processes:
            if p.is_alive():
                p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(timeout)
        if self.ipc_dir:
            remove_ipc_dir(self.ipc_dir)


def resolve_args(args: ServerArgs) -> ServerArgs:
    """Fills in what depends on the machine: the default model path, paths looked up in
    --download-dir, the CUDA devices of --base-gpu-id."""
    from kvyard.model.source import default_model_path, local_model_path

    if args.model_path is None:
        args = replace(args, model_path=default_model_path())
    elif args.download_dir is not None:
        args = replace(args, model_path=local_model_path(args.model_path, args.revision, args.download_dir),
                       tokenizer_path=args.tokenizer_path and local_model_path(
                           args.tokenizer_path, None, args.download_dir, field="tokenizer_path"))
    elif not os.path.exists(args.model_path) and not args.revision:
        raise ValueError(f"model_path: {args.model_path} does not exist")
    check_gpu_ids(args)
    if args.delete_ckpt_after_loading:
        checkpoint_to_delete(args.model_path)   # refused before anything loads
    if resolve_model_type(args.model_path, args.model_type) == "diffusion":
        raise ValueError(f"model_type: {args.model_path} is a diffusion pipeline; kvyard.Engine runs LLMs "
                         "(use kvyard.diffusion.DiffusionEngine, `kvyard generate` or `kvyard serve`)")
    return args


def replica_gpu_id(args: ServerArgs, replica: int) -> int:
    """The CUDA device of data-parallel replica ``replica`` (SGLang's base_gpu_id + i * gpu_id_step)."""
    return args.base_gpu_id + replica * args.gpu_id_step


def check_gpu_ids(args: ServerArgs) -> None:
    """--base-gpu-id / --gpu-id-step must name CUDA devices this machine has (any value is
    fine while they keep their defaults)."""
    if args.base_gpu_id == 0 and args.gpu_id_step == 1:
        return
    if args.resolved_device() != "cuda":
        raise ValueError(f"base_gpu_id: {args.base_gpu_id} (gpu_id_step {args.gpu_id_step}) names a CUDA "
                         "device, but the device is cpu")
    import torch

    last, count = replica_gpu_id(args, args.dp_size - 1), torch.cuda.device_count()
    if last >= count:
        raise ValueError(f"base_gpu_id: replicas would use CUDA device {last}; this machine has {count}")


def checkpoint_to_delete(model_path: str) -> str:
    """The checkpoint --delete-ckpt-after-loading removes: a local model folder or file, never the
    built-in default model (its package would break)."""
    from kvyard.model.source import default_model_path

    if not os.path.exists(model_path):
        raise ValueError(f"delete_ckpt_after_loading: {model_path} is not a local folder or file")
    try:
        default = default_model_path()
    except ValueError:
        default = None
    if default is not None and os.path.realpath(model_path) == os.path.realpath(default):
        raise ValueError("delete_ckpt_after_loading: refusing to delete the built-in default model")
    return model_path


def delete_checkpoint(model_path: str) -> None:
    """--delete-ckpt-after-loading, once every process has loaded the weights and the tokenizer."""
    import shutil

    path = checkpoint_to_delete(model_path)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    logger.info("deleted the checkpoint %s (--delete-ckpt-after-loading)", path)


def tokenizer_factory(args: ServerArgs):
    from kvyard.model.tokenizer import load_tokenizer
    return functools.partial(load_tokenizer, args.model_path, args.tokenizer_path, args.tokenizer_mode,
                             args.load_format, args.revision, args.trust_remote_code, args.chat_template)


def start_engine_process(args: ServerArgs) -> EngineProcess:
    """The scheduler process, started and ready; its IPC folder goes with it (parent_watch)."""
    args = resolve_args(args)
    ipc_dir = make_ipc_dir()
    try:
        engine = _start(args, ipc_dir)
    except BaseException:
        remove_ipc_dir(ipc_dir)
        raise
    if args.delete_ckpt_after_loading:
        delete_checkpoint(args.model_path)
    return engine


def _start(args: ServerArgs, ipc_dir: str) -> EngineProcess:
    from kvyard.scheduler.entry import run_scheduler_process

    ctx = mp.get_context("spawn")
    factory = None if args.skip_tokenizer_init else tokenizer_factory(args)
    link = ParentLink(os.getpid(), ipc_dir, death_signal=threading.current_thread() is threading.main_thread())
    parallel = _parallel_config(args)
    send_addrs, recv_addrs, procs, readers = [], [], [], []
    for i in range(args.dp_size):  # replicas (or ranks) load their models in parallel
        send_addrs.append(f"ipc://{ipc_dir}/to_scheduler{i}")
        recv_addrs.append(f"ipc://{ipc_dir}/from_scheduler{i}")
        for local_rank in range(parallel.ranks_per_node if parallel else 1):
            reader, writer = ctx.Pipe(duplex=False)
            name = f"kvyard-scheduler-rank{parallel.global_rank(local_rank)}" if parallel else f"kvyard-scheduler-dp{i}"
            proc = ctx.Process(target=run_scheduler_process, name=name, daemon=True,
                               args=(replace(args, base_gpu_id=replica_gpu_id(args, i)), send_addrs[i], recv_addrs[i], ModelRegistry.snapshot(), writer, factory,
                                     link, parallel, local_rank))
            proc.start()
            writer.close()
            procs.append(proc)
            readers.append(reader)
    tokenizer = factory() if factory and args.node_rank == 0 else None  # loads while the schedulers load
    try:
        infos = _wait_all_ready(procs, readers)
    except BaseException:
        EngineProcess(args, procs, {}, send_addrs, recv_addrs, None).stop(1)
        raise
    return EngineProcess(args, procs, infos[0], send_addrs, recv_addrs, tokenizer, ipc_dir)


def _parallel_config(args: ServerArgs):
    """The ParallelConfig of a tensor- or pipeline-parallel launch (a free local rendezvous port
    on one node), None for one rank."""
    if args.tp_size * args.pp_size == 1:
        return None
    from kvyard.distributed.init import free_local_addr

    parallel = args.parallel_config()
    if parallel.dist_init_addr is None:
        parallel = replace(parallel, dist_init_addr=free_local_addr())
    return parallel


def _wait_all_ready(procs: list, readers: list) -> list[dict]:
    """Each process's info, in order; the first failure (any rank) raises at once, so a rank
    that fails does not leave the launch waiting on the others' collectives."""
    from multiprocessing.connection import wait

    infos: dict[int, dict] = {}
    pending = dict(enumerate(readers))
    while pending:
        for reader in wait(list(pending.values())):
            i = next(k for k, r in pending.items() if r is reader)
            del pending[i]
            infos[i] = _wait_ready(procs[i], reader)
    return [infos[i] for i in range(len(procs))]


def _wait_ready(proc, reader) -> dict:
    try:
        ready = reader.recv()
    except EOFError:
        proc.join(1)
        raise RuntimeError(f"the scheduler process exited during start-up (exit code {proc.exitcode})") from None
    if not ready["ok"]:
        proc.join(5)
        logger.debug(ready.get("traceback", ""))
        raise ValueError(ready["error"])
    return ready["info"]


def make_tokenizer_manager(ep: EngineProcess, on_finish=None, limits=None):
    """``limits``: the server's RequestLimits (the offline Engine passes none)."""
    if ep.args.node_rank > 0:
        raise ValueError("node_rank: only node 0 takes requests; start the other nodes with "
                         "`kvyard serve --node-rank N`")
    from kvyard.grammar.manager import make_grammar_checker
    from kvyard.frontend.tokenizer_manager import TokenizerManager

    name = ep.args.served_model_name or ep.args.model_path
    grammar_checker = make_grammar_checker(ep.args.grammar_backend, ep.info["vocab_size"],
                                           ep.args.constrained_json_whitespace_pattern, ep.tokenizer is not None)
    sockets = None
    if len(ep.send_addrs) > 1:
        from kvyard.frontend.dp_controller import DataParallelController

        def sockets(zmq_ctx):
            controller = DataParallelController(zmq_ctx, ep.send_addrs, ep.recv_addrs, ep.args.load_balance_method)
            return controller, controller
    return TokenizerManager(ep.tokenizer, ep.info, ep.send_addrs[0], ep.recv_addrs[0], ep.is_alive, sockets=sockets,
                            random_seed=ep.args.random_seed, allow_auto_truncate=ep.args.allow_auto_truncate,
                            model_name=name, on_finish=on_finish, log_requests=ep.args.log_requests,
                            grammar_checker=grammar_checker,
                            incremental_streaming=ep.args.incremental_streaming_output,
                            enable_custom_logit_processor=ep.args.enable_custom_logit_processor, limits=limits,
                            enable_return_hidden_states=ep.args.enable_return_hidden_states)
