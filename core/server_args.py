"""ServerArgs: every user-facing flag of `kvyard serve` / `kvyard generate` / kvyard.Engine.

Flags use SGLang's names. The argparse parser is generated from the fields (grouped by topic for
--help); plugin-backed flags are checked against their registry at parse time. Components never
receive ServerArgs: they get the small frozen configs built by the ``*_config()`` methods.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from kvyard.mem_cache.pool_size import FORMULA as POOL_FORMULA
from kvyard.plugins import registry

SCHEDULE_POLICIES = ("fcfs", "lpm", "random", "dfs-weight", "priority")
DEFAULT_CHUNKED_PREFILL_SIZE = 8192   # --chunked-prefill-size unset
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16", "float32")
TORCHAO_CONFIG = r"int8wo|int8dq|int4wo-(32|64|128|256)|fp8wo|fp8dq-per_tensor|fp8dq-per_row"


def _f(default: Any, help: str, group: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **meta})


@dataclass
class ServerArgs:
    # -- model and tokenizer ------------------------------------------------------------
    model_path: Optional[str] = _f(None, "model folder or .gguf file (default: the installed SmolLM2-135M-Instruct GGUF)", "model")
    tokenizer_path: Optional[str] = _f(None, "tokenizer folder (default: from the model)", "model")
    tokenizer_mode: str = _f("auto", "auto: fast tokenizer if available; slow: the Python one", "model", choices=("auto", "slow"))
    skip_tokenizer_init: bool = _f(False, "take and return token ids only (no text)", "model")
    load_format: str = _f("auto", "weights format", "model", registry="load_formats", allow=("auto",))
    trust_remote_code: bool = _f(False, "allow custom model code from the hub cache", "model")
    revision: Optional[str] = _f(None, "model revision (branch, tag or commit) in the hub cache", "model")
    context_length: Optional[int] = _f(None, "maximum sequence length (default: the model's)", "model")
    is_embedding: bool = _f(False, "serve the model as an embedding model", "model")
    dtype: str = _f("auto", "weights and activations dtype", "model", choices=("auto", "float32", "float16", "bfloat16", "half", "float"))
    quantization: Optional[str] = _f(None, "keep weights quantized with this method (gguf: automatic for .gguf models)", "model", registry="quantization_methods", allow=("none",))
    torchao_config: Optional[str] = _f(None, "quantize online with torchao: int8wo, int8dq, int4wo-<group>, fp8wo, fp8dq-per_tensor, fp8dq-per_row (implies --quantization torchao)", "model")
    kv_cache_dtype: str = _f("auto", "KV cache storage dtype (auto: the model dtype); fp8 stores k/v divided by per-layer scales", "model", choices=KV_CACHE_DTYPES)
    quantization_param_path: Optional[str] = _f(None, "JSON of per-layer fp8 KV-cache scales ({\"kv_cache\": {\"scaling_factor\": {\"0\": {\"0\": s, ...}}}} or {\"k_scale\": {layer: s}, \"v_scale\": {...}}); default: the checkpoint's, else 1.0", "model")
    json_model_override_args: str = _f("", "JSON merged into the model config", "model")
    served_model_name: Optional[str] = _f(None, "model name reported by the API", "model")
    chat_template: Optional[str] = _f(None, "a .jinja file, a JSON template file, or a built-in name", "model")
    model_type: str = _f("auto", "auto: detected from the folder", "model", choices=("auto", "llm", "diffusion"))
    download_dir: Optional[str] = _f(None, "where a --model-path that is not a local path is looked up: a folder DIR/<model id>, or a Hugging Face cache at DIR (never downloaded)", "model")
    delete_ckpt_after_loading: bool = _f(False, "delete the model's checkpoint (its folder or .gguf file) once the weights are loaded", "model")
    enable_return_hidden_states: bool = _f(False, "let requests ask for the final hidden state of every token (return_hidden_states: meta_info[\"hidden_states\"])", "model")

    # -- HTTP ---------------------------------------------------------------------------
    host: str = _f("127.0.0.1", "HTTP host", "http")
    port: int = _f(30000, "HTTP port", "http")
    api_key: Optional[str] = _f(None, "require 'Authorization: Bearer KEY' on every endpoint but /health", "http")
    file_storage_path: str = _f("kvyard_storage", "folder of the /v1/files store", "http")
    enable_metrics: bool = _f(False, "serve Prometheus metrics at /metrics", "http")
    enable_sglang_metrics: bool = _f(False, "with --enable-metrics, serve every kvyard:* series under sglang:* too (SGLang's dashboards and queries)", "http")
    bucket_time_to_first_token: Optional[list[float]] = _f(None, "bucket bounds (s) of the time-to-first-token histogram", "http", nargs="+")
    bucket_inter_token_latency: Optional[list[float]] = _f(None, "bucket bounds (s) of the time-per-output-token histogram", "http", nargs="+")
    bucket_e2e_request_latency: Optional[list[float]] = _f(None, "bucket bounds (s) of the end-to-end latency histogram", "http", nargs="+")
    preferred_sampling_params: Optional[str] = _f(None, "JSON object of sampling parameters reported by /get_model_info (for clients; requests' own defaults do not change)", "http")
    weight_version: str = _f("default", "version name of the loaded weights, reported by /get_model_info and /get_weight_version", "http")
    skip_server_warmup: bool = _f(False, "do not run a warmup request before reporting ready", "http")
    warmups: Optional[str] = _f(None, "comma-separated warmup names to run at start", "http")
    config: Optional[str] = _f(None, "YAML file whose keys are these arguments; flags override it", "http")
    admin_api_key: Optional[str] = _f(None, "require 'Authorization: Bearer KEY' with this key on the admin endpoints (/update_weights_from_disk, /flush_cache, /abort_request); default: --api-key", "http")
    weight_update_dirs: Optional[list[str]] = _f(None, "folders /update_weights_from_disk may load from (default: the model's folder and its parent)", "http", nargs="+")

    # -- request limits (docs/api.md, "Limits") -------------------------------------------
    max_n: int = _f(64, "largest n (samples per prompt) one request may ask for", "limits")
    max_sequences_per_request: int = _f(256, "largest number of sequences (prompts x n) one request may ask for", "limits")
    max_top_logprobs_num: int = _f(20, "largest top_logprobs_num / top_logprobs / logprobs a request may ask for", "limits")
    max_request_body_mb: float = _f(32.0, "largest HTTP request body in MiB (413 above it)", "limits")
    http_header_timeout: float = _f(10.0, "seconds a client has to send a request's headers before the connection is closed", "limits")
    preprocess_timeout: float = _f(30.0, "seconds one request may spend in chat templating and tokenization (400 after it)", "limits")
    trust_request_chat_template: bool = _f(False, "allow requests to supply their own chat template (chat_template_kwargs.chat_template); off: refused with 400", "limits")

    # -- memory and scheduling ----------------------------------------------------------
    mem_fraction_static: Optional[float] = _f(None, "fraction of device memory for weights + KV pool (CUDA)", "scheduling")
    dp_size: int = _f(1, "data-parallel replicas: scheduler processes (each a full copy of the model) behind this API process", "scheduling")
    load_balance_method: str = _f("round_robin", "how a request picks its --dp-size replica", "scheduling", choices=("round_robin", "shortest_queue", "cache_aware"))
    max_total_tokens: Optional[int] = _f(None, f"KV pool size in tokens ({POOL_FORMULA})", "scheduling")
    max_running_requests: Optional[int] = _f(None, "maximum concurrently running requests", "scheduling")
    max_queued_requests: Optional[int] = _f(None, "reject new requests beyond this queue length", "scheduling")
    chunked_prefill_size: Optional[int] = _f(None, f"maximum prefill tokens per step per request chunk (default {DEFAULT_CHUNKED_PREFILL_SIZE}; -1 disables)", "scheduling")
    max_prefill_tokens: int = _f(16384, "maximum new tokens in one prefill batch", "scheduling")
    schedule_policy: str = _f("fcfs", "order of the waiting queue", "scheduling", choices=SCHEDULE_POLICIES)
    schedule_conservativeness: float = _f(1.0, "how much KV to reserve for running requests' future tokens", "scheduling")
    page_size: int = _f(1, "tokens per KV page", "scheduling")
    enable_priority_scheduling: bool = _f(False, "admit waiting requests by their priority field first (higher values first), the --schedule-policy order within a value; running requests are never preempted", "scheduling")
    schedule_low_priority_values_first: bool = _f(False, "with --enable-priority-scheduling: lower priority values first", "scheduling")
    enable_mixed_chunk: bool = _f(False, "running requests decode inside prefill batches: a prefill chunk and the decodes share one forward", "scheduling")
    prefill_max_requests: Optional[int] = _f(None, "most requests one prefill batch admits (default: no cap)", "scheduling")
    prefill_only_one_req: bool = _f(False, "admit one request per prefill batch (--prefill-max-requests 1)", "scheduling", optional_value=True)
    disable_radix_cache: bool = _f(False, "no prefix caching", "scheduling")
    stream_interval: int = _f(1, "stream every N tokens", "scheduling")
    num_continuous_decode_steps: int = _f(8, "most decode steps one scheduler iteration runs for a decode batch of at most 4 requests while nothing waits (their KV slots allocated at once; every token still streamed as it is sampled; the run ends at a finished request or a new message). Not with overlap scheduling, speculative decoding, grammars, penalties, logprobs or hidden states. 1 turns it off (SGLang's default)", "scheduling")
    incremental_streaming_output: bool = _f(False, "native streams (/generate, Engine) send only the new text and ids per event instead of the whole output so far", "scheduling")
    random_seed: Optional[int] = _f(None, "seed of the server's random state", "scheduling")
    watchdog_timeout: float = _f(300.0, "abort if one scheduler step takes longer than this (s)", "scheduling")
    allow_auto_truncate: bool = _f(False, "truncate over-long prompts instead of rejecting them", "scheduling")
    enable_cache_report: bool = _f(False, "accepted for SGLang compatibility: cached prompt tokens are always reported in usage", "scheduling")
    debug_kv_integrity: bool = _f(False, "check the KV integrity after every step (slow; tests)", "scheduling")

    # -- parallelism and multi-node (docs/distributed.md) --------------------------------
    tp_size: int = _f(1, "tensor-parallel ranks: one scheduler process per rank, the model's heads, MLP and vocabulary split across them (gloo on the CPU, nccl on CUDA)", "distributed")
    pp_size: int = _f(1, "pipeline stages: the decoder layers split into N contiguous stages, one process each, hidden states sent stage to stage (with --tp-size 1)", "distributed")
    nnodes: int = _f(1, "machines the ranks (tp_size x pp_size) span, world / nnodes each; node 0 serves HTTP", "distributed")
    node_rank: int = _f(0, "this machine's index among --nnodes (0 serves HTTP; the others only run their ranks)", "distributed")
    dist_init_addr: Optional[str] = _f(None, "HOST:PORT where rank 0 (node 0) listens for the other ranks to join (needed with --nnodes > 1; default: a free local port)", "distributed")
    dist_timeout: float = _f(600.0, "seconds the ranks wait for each other: joining the group, and any one collective", "distributed")

    # -- runtime and kernels ------------------------------------------------------------
    device: str = _f("auto", "auto: cuda if available, else cpu", "runtime", choices=("auto", "cuda", "cpu"))
    base_gpu_id: int = _f(0, "the CUDA device the (first) scheduler process uses", "runtime")
    gpu_id_step: int = _f(1, "CUDA device index step between --dp-size replicas (replica i: base_gpu_id + i * step)", "runtime")
    sampling_backend: str = _f("pytorch", "sampling kernels: pytorch (flashinfer is not supported yet)", "runtime", choices=("pytorch", "flashinfer"))
    attention_backend: str = _f("auto", "attention plugin", "runtime", registry="attention_backends", allow=("auto",))
    num_threads: Optional[int] = _f(None, "CPU compute threads (default: physical cores; fewer while other processes keep cores busy, see --disable-cpu-thread-adaptation)", "runtime")
    enable_torch_compile: bool = _f(False, "compile the decode step (inductor) for batch-size buckets", "runtime")
    disable_cpu_decode_loop: bool = _f(False, "CPU: run small decode batches through the Python layers instead of the C++ "
                                       "decode loop (on by default where the model, quantization and attention backend "
                                       "can be lowered; also KVYARD_CPU_DECODE_LOOP=0; KVYARD_CPU_NATIVE_STEP=0 keeps "
                                       "the loop but turns off its native step, the one-team step of decode batches "
                                       "on GGUF int kernels: up to 47 rows for the AVX-512 interleaved layouts, 15 "
                                       "otherwise)", "runtime")
    disable_cpu_thread_adaptation: bool = _f(False, "CPU: keep the thread count fixed; by default a step runs on fewer "
                                             "threads while other processes keep this process's cores busy "
                                             "(measured each second from /proc/stat), and on all of them again after", "runtime")
    torch_compile_max_bs: int = _f(32, "largest batch size compiled", "runtime")
    prefill_attention_backend: Optional[str] = _f(None, "attention plugin for extend (prefill) steps (default: --attention-backend)", "runtime", registry="attention_backends")
    decode_attention_backend: Optional[str] = _f(None, "attention plugin for decode steps (default: --attention-backend)", "runtime", registry="attention_backends")
    triton_attention_num_kv_splits: int = _f(8, "most key splits per request of the triton decode kernel (flash-decoding); fewer at large batch sizes", "runtime")
    triton_attention_reduce_in_fp32: bool = _f(False, "keep the triton decode kernel's per-split partial outputs in float32", "runtime")
    cuda_graph_max_bs: Optional[int] = _f(None, "largest decode batch captured as a CUDA graph (default: 160, capped by --max-running-requests)", "runtime")
    cuda_graph_bs: Optional[list[int]] = _f(None, "decode batch sizes to capture, e.g. 1 2 4 8 (overrides --cuda-graph-max-bs)", "runtime", nargs="+")
    disable_cuda_graph: bool = _f(False, "run decode eagerly (no CUDA-graph capture)", "runtime")
    disable_cuda_graph_padding: bool = _f(False, "replay a graph only for a batch of exactly a captured size (no padding)", "runtime")
    disable_overlap_schedule: Optional[bool] = _f(None, "schedule each batch after the previous one's results instead of while it computes; unset: overlap on CUDA, not on the CPU (measured slower there; `disable_overlap_schedule: false` in --config or the Engine forces it on)", "runtime")

    # -- speculative decoding (core/speculative.py) ------------------------------------
    speculative_algorithm: Optional[str] = _f(None, "draft tokens with this algorithm and verify them in one forward (exact: output equals plain decoding)", "speculative", registry="speculative_algorithms")
    speculative_draft_model_path: Optional[str] = _f(None, "draft model (STANDALONE: a smaller model with the target's tokenizer) or draft head folder (EAGLE, EAGLE3)", "speculative")
    speculative_draft_model_revision: Optional[str] = _f(None, "revision of the draft model", "speculative")
    speculative_draft_load_format: Optional[str] = _f(None, "weights format of the draft model (default: dummy when the target's is, else auto)", "speculative", registry="load_formats", allow=("auto",))
    speculative_num_steps: Optional[int] = _f(None, "draft depth (default: 3; NGRAM: num_draft_tokens - 1)", "speculative")
    speculative_eagle_topk: Optional[int] = _f(None, "EAGLE/EAGLE3: candidates per draft step (1: a chain; k > 1: a top-k draft tree)", "speculative")
    speculative_num_draft_tokens: Optional[int] = _f(None, "tokens verified per request and step, its last token included (default: num_steps + 1, a chain; more: a tree)", "speculative")
    speculative_accept_threshold_single: float = _f(1.0, "acceptance threshold per token (only 1.0: exact verification)", "speculative")
    speculative_accept_threshold_acc: float = _f(1.0, "accumulated acceptance threshold (only 1.0: exact verification)", "speculative")
    speculative_token_map: Optional[str] = _f(None, "EAGLE: draft only among these token ids (a torch-saved list; EAGLE3 heads carry their own map)", "speculative")
    speculative_ngram_min_match_window_size: int = _f(1, "NGRAM: shortest context suffix matched", "speculative")
    speculative_ngram_max_match_window_size: int = _f(12, "NGRAM: longest context suffix matched", "speculative")
    speculative_ngram_min_bfs_breadth: int = _f(1, "NGRAM tries: children per node at the deepest level (breadth falls linearly from the max)", "speculative")
    speculative_ngram_max_bfs_breadth: int = _f(10, "NGRAM tries: continuations merged, and children per node at depth 1", "speculative")
    speculative_ngram_match_type: str = _f("BFS", "NGRAM tries: siblings in the order found (BFS) or most shared first (PROB)", "speculative", choices=("BFS", "PROB"))
    speculative_ngram_branch_length: int = _f(18, "NGRAM: longest continuation kept per n-gram", "speculative")
    speculative_ngram_capacity: int = _f(10_000_000, "NGRAM: n-grams kept in the cache shared across requests", "speculative")

    # -- LoRA serving (core/lora/) ------------------------------------------------------
    enable_lora: bool = _f(False, "serve LoRA adapters (set automatically by --lora-paths)", "lora")
    lora_paths: Optional[list[str]] = _f(None, "adapters to load at start: PATH, NAME=PATH or JSON {\"lora_name\": ..., \"lora_path\": ...}; PEFT folders", "lora", nargs="+")
    max_loras_per_batch: int = _f(8, "adapter slots on the device: the most distinct adapters one batch uses", "lora")
    max_lora_rank: Optional[int] = _f(None, "largest adapter rank the slots hold (default: the largest of --lora-paths, else 64)", "lora")
    lora_target_modules: Optional[list[str]] = _f(None, "modules the slots serve: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, qkv_proj, gate_up_proj or all (default: those of --lora-paths, else all)", "lora", nargs="+")
    lora_backend: str = _f("auto", "LoRA matmul kernels: triton (CUDA), torch; auto: triton on CUDA, torch on the CPU", "lora", choices=("auto", "triton", "torch"))

    # -- parsers and grammar ------------------------------------------------------------
    tool_call_parser: Optional[str] = _f(None, "tool-call parser", "parsers", registry="tool_call_parsers")
    reasoning_parser: Optional[str] = _f(None, "reasoning parser", "parsers", registry="reasoning_parsers")
    grammar_backend: str = _f("xgrammar", "structured-output (grammar) backend; none disables json_schema/regex/ebnf", "parsers", registry="grammar_backends", allow=("none",))
    enable_custom_logit_processor: bool = _f(False, "let requests select a registered logit-processor plugin by name (custom_logit_processor); pickled processors are always refused", "parsers")
    constrained_json_whitespace_pattern: Optional[str] = _f(None, "regex of the whitespace allowed between JSON tokens (outlines backend)", "parsers")

    # -- logging ------------------------------------------------------------------------
    log_level: str = _f("info", "log level", "logging", choices=("debug", "info", "warning", "error"))
    log_level_http: Optional[str] = _f(None, "HTTP access log level (default: log_level)", "logging")
    log_requests: bool = _f(False, "log every request and its output", "logging")
    decode_log_interval: int = _f(40, "log a 'Decode batch' line every N decode batches (0: never)", "logging")
    show_time_cost: bool = _f(False, "follow each batch log line with the mean time of the scheduler step's stages", "logging")

    def __post_init__(self) -> None:
        if self.lora_paths:
            self.enable_lora = True   # as SGLang: adapters to load imply LoRA serving
        self.check()

    # -------------------------------------------------------------------------------------
    def check(self) -> None:
        """One-line ValueError naming the field for values argparse cannot catch."""
        positive = ("dp_size", "tp_size", "pp_size", "nnodes", "context_length", "max_total_tokens", "max_running_requests", "page_size",
                    "stream_interval", "num_continuous_decode_steps", "max_prefill_tokens", "num_threads", "torch_compile_max_bs",
                    "max_queued_requests", "triton_attention_num_kv_splits", "cuda_graph_max_bs",
                    "max_n", "max_sequences_per_request")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("prefill_max_requests", "gpu_id_step"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_gpu_id", "decode_log_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule_low_priority_values_first and not self.enable_priority_scheduling:
            raise ValueError("schedule_low_priority_values_first: needs --enable-priority-scheduling")
        if self.sampling_backend == "flashinfer":
            raise ValueError("sampling_backend: flashinfer is not supported yet by kvyard; pytorch (the default) "
                             "samples on every device")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ValueError("chunked_prefill_size must be positive or -1, got 0")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("max_request_body_mb", "http_header_timeout", "preprocess_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_top_logprobs_num < 0:
            raise ValueError(f"max_top_logprobs_num must be >= 0, got {self.max_top_logprobs_num}")
        if self.schedule_conservativeness <= 0:
            raise ValueError("schedule_conservativeness must be > 0")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}")
        for f in dataclasses.fields(self):
            kind = f.metadata.get("registry")
            value = getattr(self, f.name)
            if kind and value is not None and value not in f.metadata.get("allow", ()):
                reg = registry(kind)
                if value not in reg:
                    raise ValueError(f"{f.name}: {reg.unknown_message(value)}")
        if self.cuda_graph_bs is not None and (not self.cuda_graph_bs or min(self.cuda_graph_bs) < 1):
            raise ValueError(f"cuda_graph_bs must list batch sizes >= 1, got {self.cuda_graph_bs}")
        self.speculative_config()   # checks the speculative flags
        self._check_parallel_flags()
        self._check_lora_flags()
        self._check_quantization_flags()
        for name in ("bucket_time_to_first_token", "bucket_inter_token_latency", "bucket_e2e_request_latency"):
            value = getattr(self, name)
            if value is not None and (not value or min(value) <= 0):
                raise ValueError(f"{name} must list bucket bounds > 0, got {value}")
        if self.preferred_sampling_params is not None:
            try:
                valid = isinstance(json.loads(self.preferred_sampling_params), dict)
            except json.JSONDecodeError:
                valid = False
            if not valid:
                raise ValueError("preferred_sampling_params must be a JSON object")
        if self.json_model_override_args:
            try:
                json.loads(self.json_model_override_args)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_model_override_args is not valid JSON: {exc}") from None

    def _check_parallel_flags(self) -> None:
        world = self.tp_size * self.pp_size
        if world % self.nnodes:
            raise ValueError(f"tp_size x pp_size ({world}) must be a multiple of nnodes ({self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("dist_init_addr: --nnodes > 1 needs the HOST:PORT of node 0")
        if self.dist_init_addr:
            from kvyard.distributed.init import parse_addr
            parse_addr(self.dist_init_addr)
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0, got {self.dist_timeout}")
        if world == 1:
            return
        if self.tp_size > 1 and self.pp_size > 1:
            raise ValueError("pp_size: not supported yet together with --tp-size > 1")
        flag = "--tp-size" if self.tp_size > 1 else "--pp-size"
        for name, on in (("dp_size", self.dp_size > 1), ("enable_torch_compile", self.enable_torch_compile),
                         ("speculative_algorithm", self.speculative_algorithm is not None)):
            if on:
                raise ValueError(f"{name}: not supported yet together with {flag} > 1")

    def parallel_config(self):
        """The kvyard.distributed.ParallelConfig of the parallelism flags."""
        from kvyard.distributed import ParallelConfig

        return ParallelConfig(tp_size=self.tp_size, pp_size=self.pp_size, nnodes=self.nnodes, node_rank=self.node_rank,
                              dist_init_addr=self.dist_init_addr, dist_timeout=self.dist_timeout,
                              device=self.resolved_device())

    def _check_quantization_flags(self) -> None:
        import re

        if self.torchao_config is not None:
            if not re.fullmatch(TORCHAO_CONFIG, self.torchao_config):
                raise ValueError(f"torchao_config: {self.torchao_config!r} is not one of int8wo, int8dq, "
                                 "int4wo-<32|64|128|256>, fp8wo, fp8dq-per_tensor, fp8dq-per_row")
            if self.quantization not in (None, "torchao"):
                raise ValueError(f"torchao_config: it quantizes with torchao; --quantization "
                                 f"{self.quantization} conflicts with it")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization_param_path is not None and not os.path.isfile(self.quantization_param_path):
            raise ValueError(f"quantization_param_path: no such file {self.quantization_param_path}")

    def _check_lora_flags(self) -> None:
        from kvyard.lora.config import LoRAError, normalize_target_modules, parse_lora_paths

        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        try:
            parse_lora_paths(self.lora_paths)
            normalize_target_modules(self.lora_target_modules)
        except LoRAError as exc:
            raise ValueError(str(exc)) from None
        if self.enable_lora and self.enable_torch_compile:
            raise ValueError("enable_torch_compile: not supported with --enable-lora yet")
        if self.enable_lora and self.dp_size > 1:
            raise ValueError("enable_lora: not supported with --dp-size > 1 yet")
        if self.enable_lora and self.is_embedding:
            raise ValueError("enable_lora: not supported for embedding models yet")

    def lora_config(self):
        """The LoRAConfig (None when LoRA serving is off). Unset rank and target modules follow
        the adapters given at start (their adapter_config.json), as SGLang does."""
        if not self.enable_lora:
            return None
        from kvyard.lora.config import (TARGET_MODULES, LoRAConfig, normalize_target_modules, parse_lora_paths,
                                        peek_adapter)

        adapters = parse_lora_paths(self.lora_paths)
        peeked = [peek_adapter(name, path) for name, path in adapters.items()]
        rank = self.max_lora_rank or max((r for r, _ in peeked), default=64)
        modules = normalize_target_modules(self.lora_target_modules)
        if modules is None:   # an adapter config of "all-linear" or unknown names: every module
            named = [m for _, mods in peeked for m in mods]
            modules = normalize_target_modules(named) if named else TARGET_MODULES
        backend = self.lora_backend
        if backend == "auto":
            backend = "triton" if self.resolved_device() == "cuda" else "torch"
        return LoRAConfig(max_loras_per_batch=self.max_loras_per_batch, max_lora_rank=rank,
                          target_modules=modules, backend=backend, adapters=tuple(adapters.items()))

    def quantization_name(self) -> Optional[str]:
        """--quantization, or torchao when only --torchao-config is given."""
        return "torchao" if self.torchao_config and self.quantization is None else self.quantization

    def quantization_options(self) -> Optional[dict]:
        return {"torchao_config": self.torchao_config} if self.torchao_config else None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def attention_options(self) -> dict:
        """AttentionConfig.options: the backend-specific flags (each backend reads its own)."""
        return {"triton_attention_num_kv_splits": self.triton_attention_num_kv_splits,
                "triton_attention_reduce_in_fp32": self.triton_attention_reduce_in_fp32}

    def cuda_graph_config(self):
        from kvyard.executor.cuda_graph_runner import CudaGraphConfig

        return CudaGraphConfig(max_bs=self.cuda_graph_max_bs,
                               batch_sizes=tuple(self.cuda_graph_bs) if self.cuda_graph_bs else None,
                               disable=self.disable_cuda_graph, disable_padding=self.disable_cuda_graph_padding)

    def speculative_config(self):
        """The SpeculativeConfig (None when speculative decoding is off); ValueError naming the
        flag for combinations that cannot work."""
        from kvyard.speculative import config_from_args

        return config_from_args(self)

    def runner_config(self):
        from kvyard.executor.model_runner import RunnerConfig

        return RunnerConfig(
            model_path=self.model_path, load_format=self.load_format, dtype=self.dtype,
            device=self.resolved_device(), quantization=self.quantization_name(),
            quantization_options=self.quantization_options(), kv_cache_dtype=self.kv_cache_dtype,
            quantization_param_path=self.quantization_param_path,
            attention_backend=self.attention_backend, revision=self.revision,
            prefill_attention_backend=self.prefill_attention_backend,
            decode_attention_backend=self.decode_attention_backend, attention_options=self.attention_options(),
            trust_remote_code=self.trust_remote_code, context_length=self.context_length,
            json_model_override_args=self.json_model_override_args, is_embedding=self.is_embedding,
            page_size=self.page_size, max_total_tokens=self.max_total_tokens,
            mem_fraction_static=self.mem_fraction_static, max_running_requests=self.max_running_requests,
            num_threads=self.num_threads, random_seed=self.random_seed, cuda_graph=self.cuda_graph_config(),
            enable_torch_compile=self.enable_torch_compile, torch_compile_max_bs=self.torch_compile_max_bs,
            lora=self.lora_config(),
            disable_cpu_decode_loop=self.disable_cpu_decode_loop,
            adapt_cpu_threads=not self.disable_cpu_thread_adaptation)

    def scheduler_config(self, max_running_requests: int, context_length: int, enable_overlap: bool):
        """The scheduler's config; the arguments are what the loaded model and pool resolved."""
        from kvyard.scheduler.scheduler import SchedulerConfig

        chunk = self.chunked_prefill_size if self.chunked_prefill_size is not None else DEFAULT_CHUNKED_PREFILL_SIZE
        return SchedulerConfig(
            max_running_requests=max_running_requests, context_length=context_length,
            chunked_prefill_size=chunk, max_prefill_tokens=self.max_prefill_tokens,
            schedule_policy=self.schedule_policy, schedule_conservativeness=self.schedule_conservativeness,
            disable_radix_cache=self.disable_radix_cache, stream_interval=self.stream_interval,
            random_seed=self.random_seed, debug_kv_integrity=self.debug_kv_integrity,
            max_queued_requests=self.max_queued_requests, enable_overlap=enable_overlap,
            enable_mixed_chunk=self.enable_mixed_chunk,
            prefill_max_requests=1 if self.prefill_only_one_req else self.prefill_max_requests,
            decode_log_interval=self.decode_log_interval, show_time_cost=self.show_time_cost,
            num_continuous_decode_steps=self.num_continuous_decode_steps,
            priority_sign=(-1 if self.schedule_low_priority_values_first else 1) if self.enable_priority_scheduling else 0)

    # -- argparse -------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, groups: Optional[set[str]] = None) -> None:
        titles = {"model": "model and tokenizer", "http": "HTTP server", "scheduling": "memory and scheduling",
                  "runtime": "runtime and kernels", "distributed": "parallelism and multi-node", "parsers": "parsers and grammar", "speculative": "speculative decoding",
                  "lora": "LoRA serving",
                  "limits": "request limits", "logging": "logging"}
        arg_groups = {g: parser.add_argument_group(t) for g, t in titles.items()
                      if groups is None or g in groups}
        for f in dataclasses.fields(cls):
            group = arg_groups.get(f.metadata["group"])
            if group is not None:
                add_field_argument(group, f)
        from kvyard.compat.flags import add_sglang_flags
        add_sglang_flags(parser, {f.name for f in dataclasses.fields(cls)})

    @classmethod
    def from_cli_namespace(cls, ns: argparse.Namespace) -> "ServerArgs":
        """ServerArgs from a parsed command line; ValueError naming any SGLang flag kvyard refuses."""
        from kvyard.compat.flags import refusal_message, refused_flags

        refused = refused_flags(ns)
        if refused:
            raise ValueError(refusal_message(refused))
        values = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(cls)}}
        if values.get("config"):
            values = {**load_yaml_config(values["config"]), **values}
        return cls(**values)


def add_field_argument(group, f: dataclasses.Field) -> None:
    """One --flag for a dataclass field declared with _f (help, group, choices/registry/nargs;
    negatable bools get --no-flag too). Unset flags stay out of the namespace (SUPPRESS)."""
    flag = "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": argparse.SUPPRESS}
    if f.metadata.get("optional_value"):   # --flag, or --flag true|false
        group.add_argument(flag, nargs="?", const=True, type=_str2bool, **kwargs)
        return
    if f.type in ("bool", bool, "Optional[bool]"):   # Optional: unset leaves an automatic default
        action = argparse.BooleanOptionalAction if f.metadata.get("negatable") else "store_true"
        group.add_argument(flag, action=action, **kwargs)
        return
    kwargs["type"] = _arg_type(f.type)
    if "nargs" in f.metadata:
        kwargs["nargs"] = f.metadata["nargs"]
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    elif "registry" in f.metadata:
        kwargs["type"] = _registry_choice(f.metadata["registry"], f.metadata.get("allow", ()))
    group.add_argument(flag, **kwargs)


def _str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _arg_type(annotation: str):
    text = str(annotation)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def _registry_choice(kind: str, allow: tuple[str, ...]):
    def check(value: str) -> str:
        if value in allow or value in registry(kind):
            return value
        raise argparse.ArgumentTypeError(registry(kind).unknown_message(value))
    check.__name__ = kind[:-1].replace("_", " ")
    return check


def read_yaml_mapping(path: str) -> dict:
    """A --config YAML file as a mapping; one-line ValueError naming config otherwise."""
    import yaml

    if not os.path.exists(path):
        raise ValueError(f"config: file {path!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of argument names to values")
    return data


def load_yaml_config(path: str) -> dict:
    data = read_yaml_mapping(path)
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"config: unknown argument {key!r} in {path}")
        out[name] = value
    return out
