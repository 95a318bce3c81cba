"""ModelRunner: owns the model, the KV memory and the sampler; runs one ScheduleBatch per call.

prepare (ScheduleBatch -> ForwardBatch) / forward (model + logits) / sample. The only host
sync per step is the copy of the sampled ids (and logprobs when asked).

Under tensor parallelism (``tp``) the runner of each rank builds the model for its rank
(kvyard.model_base), reads only its slices of a safetensors checkpoint, and sizes the KV pool and
the attention backend for its local heads; the logits it samples from are gathered, so every
rank samples the same ids. Under pipeline parallelism (``pp``) it builds its stage's layers
and KV, and a step passes hidden states stage to stage (kvyard.distributed.pipeline).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from kvyard.attention import AttentionConfig, layer_features
from kvyard.attention.hybrid import build_attention_backend
from kvyard.distributed import ONE_STAGE, SINGLE, PipelineStage, TensorParallel
from kvyard.distributed.collectives import broadcast_object
from kvyard.executor.cuda_graph_runner import CudaGraphRunner
from kvyard.executor.backend_select import checkpoint_quantization, resolve_attention_backends, resolve_quantization
from kvyard.layers.attention import Attention
from kvyard.forward_batch import ForwardBatch, ForwardMode, TreeMask
from kvyard.kv_layout import KVLayout
from kvyard.loader import LoadConfig
from kvyard.mem_cache.allocator import SlotAllocator
from kvyard.mem_cache.kv_pool import KVPool
from kvyard.mem_cache.pool_size import available_memory, default_cpu_pool_tokens
from kvyard.mem_cache.kv_quant import check_backends, is_fp8, kv_scales, resolve_kv_dtype
from kvyard.mem_cache.req_to_token import ReqToTokenPool
from kvyard.model_base import ModelBuildContext
from kvyard.model.config import ModelConfig, resolve_dtype
from kvyard.model_registry import ModelRegistry
from kvyard.plugins import registry
from kvyard.model.pooling import EmbeddingAdapter, PoolingConfig, pooling_config_from_folder
from kvyard.quantization import QuantizationConfig
from kvyard.sampling.sampler import Sampler
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult
from kvyard.speculative import spec_features
from kvyard.executor.host_pack import to_device
from kvyard.executor.step_sampling import sample_outputs, sampling_spec, to_step_result

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    model_path: str
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    quantization: Optional[str] = None
    quantization_options: Optional[dict] = None       # QuantizationConfig.options (e.g. torchao recipe)
    kv_cache_dtype: str = "auto"                      # auto | fp8_e4m3 | fp8_e5m2 | bfloat16 | float32
    quantization_param_path: Optional[str] = None     # JSON of per-layer KV scales
    attention_backend: str = "auto"
    prefill_attention_backend: Optional[str] = None   # extend steps (default: attention_backend)
    decode_attention_backend: Optional[str] = None    # decode steps (default: attention_backend)
    attention_options: Optional[dict] = None          # AttentionConfig.options
    revision: Optional[str] = None
    trust_remote_code: bool = False
    context_length: Optional[int] = None
    json_model_override_args: str = ""
    is_embedding: bool = False
    page_size: int = 1
    max_total_tokens: Optional[int] = None
    mem_fraction_static: Optional[float] = None
    max_running_requests: Optional[int] = None
    num_threads: Optional[int] = None
    random_seed: Optional[int] = None
    cuda_graph: Optional[object] = None               # kvyard.executor.cuda_graph_runner.CudaGraphConfig
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32
    lora: Optional[object] = None                     # kvyard.lora.LoRAConfig; None: LoRA serving off
    disable_cpu_decode_loop: bool = False
    adapt_cpu_threads: bool = True                    # kvyard.executor.cpu_threads


def physical_cores() -> int:
    try:
        import psutil
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class ModelRunner:
    def __init__(self, config: RunnerConfig, tp: TensorParallel = SINGLE, pp: PipelineStage = ONE_STAGE,
                 world: TensorParallel | None = None):
        """tp: this rank's tensor-parallel group; pp: its pipeline stage; world: every rank."""
        self.config = config
        self.tp, self.pp, self.world = tp, pp, world or tp
        self.device = config.device
        self.cpu_threads = None   # FreeCoreThreads: fewer threads while other processes hold cores
        if self.device == "cpu":
            torch.set_num_threads(config.num_threads or physical_cores())
            if config.adapt_cpu_threads:
                from kvyard.executor.cpu_threads import FreeCoreThreads
                self.cpu_threads = FreeCoreThreads(torch.get_num_threads())
        if config.random_seed is not None:
            torch.manual_seed(config.random_seed)
        self._load_model()
        self.lora = self._init_lora()
        self._init_memory()
        attention = self._attention_config()
        requested = config.attention_backend
        if is_fp8(self.kv_dtype) and requested == "auto":
            requested = "triton" if self.device == "cuda" else "torch_native"
            logger.info("attention backend: %s (auto: it reads the fp8 KV cache)", requested)
        prefill_name, decode_name = resolve_attention_backends(
            requested, config.prefill_attention_backend, config.decode_attention_backend,
            self.device, attention=attention)
        # one choice for the group: "auto" times backends, and the ranks' timings may differ
        prefill_name, decode_name = broadcast_object((prefill_name, decode_name), self.world)
        check_backends(self.kv_dtype, {n: registry("attention_backends").get(n) for n in {prefill_name, decode_name}})
        self.attn_backend, self.attn_backend_name = build_attention_backend(attention, prefill_name, decode_name)
        self.attention_names = (prefill_name, decode_name)
        self.sampler = Sampler()
        # hidden states a speculative draft head reads (enable_hidden_capture); None: none
        self.capture_layers: Optional[tuple[int, ...]] = None
        self.decode_graphs = self._init_decode_graphs()
        self.extend_graphs = None        # enable_extend_graphs (speculative verify / draft catch-up)

    def enable_hidden_capture(self, layers: tuple[int, ...]) -> None:
        """Every generation step from now on keeps the hidden states of ``layers`` (layer ids,
        FINAL_HIDDEN for the final normed state; core/forward_batch.py) for all its token rows:
        ``StepResult.captured_hidden`` [T, len(layers) * hidden]. CUDA graphs are captured again
        to return those states beside the logits (the CPU decode loop and torch.compile buckets
        keep only logits: such steps run eagerly)."""
        if not hasattr(self.model, "input_embeddings"):
            raise ValueError(f"speculative_algorithm: the model {self.model_config.architectures[0]} does "
                             "not expose its hidden states to a draft head (kvyard.model_base)")
        num_layers = self.model_config.num_layers
        bad = [i for i in layers if not (i == -1 or 0 <= i < num_layers)]
        if bad:
            raise ValueError(f"speculative_draft_model_path: the draft head reads target layers {bad}, "
                             f"the target has {num_layers}")
        self.capture_layers = tuple(layers)
        if type(self.decode_graphs) is CudaGraphRunner:   # not the torch.compile subclass
            self.decode_graphs = self._init_decode_graphs()
        if self.extend_graphs is not None:
            self.enable_extend_graphs(self.extend_graphs.width, self.extend_graphs.pad_table_entries)

    def enable_extend_graphs(self, tokens_per_req: int, pad_table_entries: bool = True) -> None:
        """CUDA graphs for extends of at most ``tokens_per_req`` new tokens per request (the
        speculative verify step; kvyard.executor.extend_graph_runner), where decode steps have
        CUDA graphs (so not with --disable-cuda-graph) and the attention backend can capture
        extends; otherwise those steps stay eager (logged). ``pad_table_entries=False``: the
        caller has written slots it still needs past a request's new tokens (the runner's
        docstring)."""
        from kvyard.executor.extend_graph_runner import ExtendGraphRunner

        if type(self.decode_graphs) is not CudaGraphRunner or self.decode_graphs.buffers is None:
            return
        if not self.attn_backend.supports_extend_graph:
            logger.info("extend CUDA graphs off: attention backend %s cannot capture extend steps",
                        self.attn_backend_name)
            return
        if self.lora is not None:
            logger.info("extend CUDA graphs off: LoRA serving")
            return
        runner = ExtendGraphRunner(self.decode_graphs.config, tokens_per_req, self._graph_step, self.attn_backend,
                                   self.kv_pool, self.req_to_token.table, self.max_running_requests, self.device,
                                   capture_layers=self.capture_layers, pad_table_entries=pad_table_entries)
        runner.capture()
        self.extend_graphs = runner

    def _init_decode_graphs(self):
        """CUDA graphs on CUDA (unless disabled or the backend cannot), torch.compile buckets
        with --enable-torch-compile; both pad decode batches to a bucket with the dummy row.
        On the CPU otherwise: the C++ decode loop for small batches where the model lowers."""
        from kvyard.executor.compiled_decode import CompiledDecodeRunner
        from kvyard.executor.cuda_graph_runner import CudaGraphConfig

        cfg = self.config
        if not getattr(self.model, "is_generation", True):
            return None
        if self.pp.enabled:
            logger.info("decode graphs off: a pipeline stage's step waits on its neighbours")
            return None
        if cfg.enable_torch_compile:
            runner = CompiledDecodeRunner(cfg.torch_compile_max_bs, self._logits_step, self.attn_backend,
                                          self.kv_pool, self.req_to_token.table, self.max_running_requests,
                                          self.device)
        elif self.device == "cpu":
            from kvyard.executor.lowered_decode import LoweredDecodeRunner
            if cfg.disable_cpu_decode_loop:
                logger.info("C++ decode loop off: --disable-cpu-decode-loop")
                return None
            if self.lora is not None or self.tp.enabled:   # the loop runs neither LoRA hooks nor all-reduces
                logger.info("C++ decode loop off: %s", "LoRA serving" if self.lora is not None else "tensor parallelism")
                return None
            return LoweredDecodeRunner.build(self.model, self.attn_backend, self.kv_pool, self.device)
        elif self.device == "cuda" and not (cfg.cuda_graph or CudaGraphConfig()).disable:
            if not self.attn_backend.supports_cuda_graph:
                logger.info("CUDA graphs off: attention backend %s does not support them", self.attn_backend_name)
                return None
            if self.lora is not None and self.lora.config.backend != "triton":
                logger.info("CUDA graphs off: --lora-backend %s cannot be captured", self.lora.config.backend)
                return None
            runner = CudaGraphRunner(cfg.cuda_graph or CudaGraphConfig(), self._graph_step, self.attn_backend,
                                     self.kv_pool, self.req_to_token.table, self.max_running_requests, self.device,
                                     with_lora=self.lora is not None, capture_layers=self.capture_layers)
        else:
            return None
        runner.capture()
        return runner

    def _init_lora(self):
        """The LoRAManager (kvyard.lora) hooked into the model's linear layers, or None."""
        if self.config.lora is None:
            return None
        from kvyard.lora.manager import LoRAManager

        if self.config.enable_torch_compile:
            raise ValueError("enable_torch_compile: not supported with --enable-lora yet")
        return LoRAManager(self.config.lora, self.model, self.dtype, self.device)

    def _graph_step(self, fb: ForwardBatch):
        """What a CUDA graph captures: the logits [N, vocab] of ``fb.logits_indices``, or with
        ``fb.capture_layers`` the tuple (logits, hidden states of each of those layers [T, D])."""
        logits = self._logits_step(fb)
        if not fb.capture_layers:
            return logits
        return (logits, *(fb.captured[i] for i in fb.capture_layers))

    def _logits_step(self, fb: ForwardBatch) -> torch.Tensor:
        """The decode step a graph captures: model + logits of every row, [B, vocab]."""
        if self.lora is not None:
            self.lora.bind(fb.lora)   # the hooks read this step's slots (graph inputs when captured)
        if self.pp.enabled:
            from kvyard.distributed.pipeline import pipeline_logits

            mc = self.model_config
            return pipeline_logits(self.model, fb, self.pp, mc.hf_config.hidden_size, mc.vocab_size, self.dtype)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        return self.model.compute_logits(hidden[fb.logits_indices])

    # -- model ------------------------------------------------------------------------------
    def _load_model(self) -> None:
        cfg = self.config
        quant_name = cfg.quantization
        load_config = LoadConfig(load_format=cfg.load_format, revision=cfg.revision,
                                 device=self.device, trust_remote_code=cfg.trust_remote_code,
                                 json_model_override_args=cfg.json_model_override_args)
        self.model_config = ModelConfig.from_path(
            cfg.model_path, load_config, context_length=cfg.context_length,
            json_model_override_args=cfg.json_model_override_args, is_embedding=cfg.is_embedding)
        mc = self.model_config
        if quant_name is None and cfg.dtype == "float32" and mc.load_format == "gguf":
            quant_name = "none"  # explicit float32: the exact dequantized path
        self.dtype = resolve_dtype(cfg.dtype, self.device, mc.config_dtype)
        quant_name = resolve_quantization(quant_name, mc.load_format, mc.hf_config)
        quant = None
        if quant_name:
            quant = registry("quantization_methods").get(quant_name)(QuantizationConfig(
                quant_name, self.dtype, self.device, checkpoint=checkpoint_quantization(mc.hf_config),
                options=cfg.quantization_options))
        self.quantization = quant_name
        # quantized weights and their scales reach the method as stored (no cast to the dtype)
        load_config = LoadConfig(**{**load_config.__dict__, "load_format": mc.load_format, "dtype": self.dtype,
                                    "keep_quantized": quant_name == "gguf" if mc.load_format == "gguf"
                                    else quant_name is not None, "lazy_slices": self.tp.enabled})
        loader = registry("load_formats").get(mc.load_format)(load_config)
        model_cls = ModelRegistry.resolve(mc.architectures)
        if self.tp.enabled and not getattr(model_cls, "supports_tensor_parallel", False):
            raise ValueError(f"tp_size: {mc.architectures[0]} does not support tensor parallelism yet "
                             f"(tp_size {self.tp.size})")
        if self.pp.enabled and not (getattr(model_cls, "supports_pipeline_parallel", False) and not cfg.is_embedding):
            raise ValueError(f"pp_size: {mc.architectures[0]}{' as an embedding model' if cfg.is_embedding else ''} "
                             f"does not support pipeline parallelism yet (pp_size {self.pp.size})")
        with torch.device(self.device):
            self.model = model_cls(mc.hf_config, ModelBuildContext(self.dtype, self.device, quant, self.tp, self.pp))
        self.model.load_weights(loader.weights(mc.model_path, mc.hf_config))
        self.model = self._with_pooling(self.model, mc.model_path)
        self.model.eval()
        logger.info("loaded %s (%s, %s, dtype %s, quantization %s) on %s", mc.model_path,
                    mc.architectures[0], mc.load_format, self.dtype, quant_name, self.device)

    def _with_pooling(self, model: torch.nn.Module, model_path: str) -> torch.nn.Module:
        """--is-embedding wraps a generation model in an EmbeddingAdapter; an embedding model's
        ``pooling`` follows the folder's sentence-transformers files when it has them."""
        wrap = self.config.is_embedding and getattr(model, "is_generation", True)
        if not wrap and not hasattr(model, "pooling"):
            return model   # generation and classification models: their folder's pooling files do not apply
        declared = pooling_config_from_folder(model_path)
        if wrap:
            pooling = declared or PoolingConfig(method="last", normalize=True)
            logger.info("serving %s as an embedding model: %s pooling%s (%s)", type(model).__name__,
                        pooling.method, ", normalized" if pooling.normalize else "",
                        "sentence-transformers files" if declared else "default for decoders")
            return EmbeddingAdapter(model, pooling)
        if declared is not None:
            model.pooling = declared
        return model

    def update_weights(self, model_path: str, load_format: Optional[str] = None) -> None:
        """Loads the checkpoint at model_path into a fresh model object and swaps it in.

        The KV pool and the attention backend stay, so the checkpoint must have the same
        architecture and KV shape. On any failure this raises and the old model keeps serving."""
        from dataclasses import replace

        keep = ("config", "model", "model_config", "dtype", "quantization")
        old = {name: getattr(self, name) for name in keep}
        self.config = replace(self.config, model_path=model_path, load_format=load_format or "auto")
        try:
            self._load_model()
            self._check_same_shape(old["model_config"], old["dtype"])
            if self.lora is not None:
                self.lora.attach(self.model)   # the new model object's linears get the hooks
        except BaseException:
            for name, value in old.items():
                setattr(self, name, value)
            raise
        if self.decode_graphs is not None:
            self.decode_graphs = self._init_decode_graphs()  # graphs captured the old weights
        if self.extend_graphs is not None:
            self.enable_extend_graphs(self.extend_graphs.width, self.extend_graphs.pad_table_entries)
        logger.info("weights updated from %s", model_path)

    def _check_same_shape(self, old: ModelConfig, old_dtype: torch.dtype) -> None:
        new = self.model_config
        for name in ("architectures", "num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(new, name) != getattr(old, name):
                raise ValueError(f"model_path: {name} differs from the served model's "
                                 f"({getattr(new, name)} vs {getattr(old, name)})")
        if self.dtype != old_dtype:
            raise ValueError(f"model_path: dtype {self.dtype} differs from the served model's {old_dtype}")

    # -- memory -----------------------------------------------------------------------------
    def _kv_layout(self) -> KVLayout:
        """The model's declared KV layout (kvyard.kv_layout), else K/V per head from its config
        (this rank's KV heads under tensor parallelism, its stage's layers under pipeline parallelism)."""
        declare = getattr(self.model, "kv_layout", None)
        if declare is not None:
            return declare()
        mc = self.model_config
        layers = len(self.pp.layers(mc.num_layers))   # this stage's
        return KVLayout.mha(layers, self.tp.split_kv_heads(mc.num_kv_heads).size, mc.head_dim)

    def _init_memory(self) -> None:
        cfg, mc = self.config, self.model_config
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype)
        self.kv_layout = layout = self._kv_layout()
        per_slot = layout.bytes_per_token(self.kv_dtype)
        tokens = cfg.max_total_tokens or self._default_pool_tokens(per_slot)
        page = cfg.page_size
        num_slots = (tokens // page + 1) * page  # + the dummy page
        self.max_total_tokens = num_slots - page
        self.kv_pool_slots = num_slots
        scales = kv_scales(self.kv_dtype, self.model, layout.num_layers, cfg.quantization_param_path)
        self.kv_pool = KVPool.for_layout(num_slots, layout, self.kv_dtype, self.device, scales)
        # page bookkeeping stays on the host: its small ops would each be a launch (and the
        # frees a sync) on a GPU; slots reach the device once per step, in prepare()
        self.allocator = SlotAllocator(num_slots, page, "cpu")
        max_reqs = cfg.max_running_requests or max(1, min(512, self.max_total_tokens // 64))
        self.max_running_requests = max_reqs
        self.req_to_token = ReqToTokenPool(max_reqs, self.model_config.context_length + page, self.device)
        logger.info("KV pool: %d tokens (%.1f MiB, %s), page size %d, %d request rows",
                    self.max_total_tokens, num_slots * per_slot / 2**20, layout.describe(), page, max_reqs)

    def _default_pool_tokens(self, per_slot: int) -> int:
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            fraction = self.config.mem_fraction_static or 0.88
            budget = free - total * (1 - fraction)
            return max(1024, int(budget // per_slot))
        # the formula in kvyard.mem_cache.pool_size (also in `kvyard serve --help`)
        return default_cpu_pool_tokens(self.model_config.context_length, per_slot, available_memory())

    def _attention_config(self) -> AttentionConfig:
        mc, layout = self.model_config, self.kv_layout
        heads = self.tp.split(mc.num_heads, "num_attention_heads").size   # this rank's query heads
        return AttentionConfig(num_heads=heads, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                               dtype=self.dtype, device=self.device, page_size=self.config.page_size,
                               max_context_len=mc.context_length, max_batch_size=self.max_running_requests,
                               options=dict(self.config.attention_options or {}), kv_layout=layout,
                               features=layer_features(m for m in self.model.modules() if isinstance(m, Attention))
                               | spec_features(self.config))

    # -- one step ---------------------------------------------------------------------------
    def prepare(self, batch: ScheduleBatch) -> ForwardBatch:
        dev = self.device
        long = dict(dtype=torch.int64, device=dev)
        extend_lens = batch.extend_lens
        starts, acc = [], 0
        for n in extend_lens:
            starts.append(acc)
            acc += n
        rows = batch.sample_rows + [row for _, row, _ in batch.input_logprob_rows]
        # the host lists and the KV slots reach the device in one copy (kvyard.executor.host_pack)
        parts = [batch.input_ids, batch.positions, batch.req_pool_indices(), batch.seq_lens, starts, rows]
        fill = batch.draft_fill
        if fill is not None:   # verify rows whose drafts are still on the device: (drafts, rows, index)
            parts += fill[1:]
        input_ids, positions, req_rows, seq_lens, start_loc, logits_rows, *fill_at, out_cache_loc = \
            to_device(parts, batch.out_cache_loc, dev)
        if fill is not None:   # written on the device: nothing waits for the drafts on the host
            input_ids[fill_at[0]] = fill[0][fill_at[1]]
        fb = ForwardBatch(
            mode=batch.mode, batch_size=batch.batch_size, input_ids=input_ids, positions=positions,
            out_cache_loc=out_cache_loc, req_pool_indices=req_rows, seq_lens=seq_lens,
            seq_lens_cpu=batch.seq_lens, extend_prefix_lens_cpu=batch.prefix_lens, extend_seq_lens_cpu=extend_lens,
            extend_start_loc=start_loc, logits_indices=logits_rows,
            req_to_token=self.req_to_token.table, kv_pool=self.kv_pool, attn_backend=self.attn_backend,
            capture_layers=self.capture_layers)
        fb.spec_verify = batch.is_verify
        if batch.is_verify and not all(t.is_chain for t in batch.draft_tokens):
            fb.spec_tree = TreeMask.from_rows([t.mask() for t in batch.draft_tokens], dev)
        if batch.hidden_rows:
            fb.hidden_indices = torch.tensor([row for _, row in batch.hidden_rows], **long)
        if self.lora is not None:   # [B] each request's adapter slot (-1: the base model)
            fb.lora = self.lora.batch_info([r.lora_slot for r in batch.reqs], extend_lens)
        if any(r.token_type_ids for r in batch.reqs):   # encoder pairs: [T] segment of each new token
            types = [t for r, p, n in zip(batch.reqs, batch.prefix_lens, extend_lens)
                     for t in (r.token_type_ids[p:p + n] if r.token_type_ids else [0] * n)]
            fb.extras["token_type_ids"] = torch.tensor(types, **long)
        return fb

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch, positions: Optional[list[int]] = None) -> StepResult:
        """One step of ``batch`` run to its host results; positions [S]: each sampled request's
        sequence length (default: their seq_len now)."""
        fb = self.prepare(batch)
        if not getattr(self.model, "is_generation", True):
            if self.cpu_threads is not None:
                self.cpu_threads.adjust()
            self.attn_backend.init_forward_metadata(fb)
            if self.lora is not None:
                self.lora.bind(fb.lora)
            hidden = self.model(fb.input_ids, fb.positions, fb)
            return StepResult(next_ids=[], embeddings=self.model.pool(hidden, fb).float().cpu())
        logits, hidden = self.forward_outputs(fb)
        if positions is None:
            positions = [batch.reqs[i].seq_len for i in batch.sample_req_idx]
        spec = sampling_spec(batch, positions, logits.device)
        result = to_step_result(sample_outputs(self.sampler, spec, logits, hidden), spec.top_logprobs_nums)
        result.captured_hidden = captured_hidden(fb)
        return result

    @torch.inference_mode()
    def sample_on_device(self, fb: ForwardBatch, sampling_info, positions: torch.Tensor) -> torch.Tensor:
        """int64 [S] the tokens sampled at the sample rows of a ``prepare``d batch (no logprobs),
        left on the device: no host sync (a draft model's chain feeds them to its next step);
        positions [S] int64 on the device, as ``forward``'s."""
        logits, _ = self.forward_outputs(fb)
        return self.sampler(logits, sampling_info, positions).next_ids

    # -- overlap scheduling hooks (core/executor/overlap_worker.py runs them on its thread) ----
    @torch.inference_mode()
    def forward_outputs(self, fb: ForwardBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``forward_logits``, plus the float32 final hidden states [K, hidden] of the rows
        ``fb.hidden_indices`` names (None without): the model's forward rows as they are (the
        contract of kvyard.model_base), so every model serves return_hidden_states. Such a step
        runs eagerly (the decode graphs return logits only)."""
        if self.cpu_threads is not None:   # here: the thread that computes, also under overlap
            self.cpu_threads.adjust()
        if fb.hidden_indices is None:
            return self.forward_logits(fb), None
        self.attn_backend.init_forward_metadata(fb)
        if self.lora is not None:
            self.lora.bind(fb.lora)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        return self.model.compute_logits(hidden[fb.logits_indices]), hidden[fb.hidden_indices].float()

    @torch.inference_mode()
    def forward_logits(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [len(fb.logits_indices), V] of a generation batch already ``prepare``d, left
        on the device (decode batches replay the decode graphs, as in ``forward``). Overlap
        prepares batch N+1 while N computes, so ``prepare`` must not reuse per-step buffers."""
        for graphs in (self.decode_graphs, self.extend_graphs):
            if graphs is not None and getattr(graphs, "capture_layers", None) == fb.capture_layers \
                    and graphs.can_run(fb):
                return self._replay(graphs, fb)
        self.attn_backend.init_forward_metadata(fb)
        return self._logits_step(fb)

    def _replay(self, graphs, fb: ForwardBatch) -> torch.Tensor:
        """The logits of a replayed step; the hidden states it captured go to ``fb.captured`` as
        the eager model would put them (copies: the graph's outputs are overwritten next step)."""
        out = graphs.replay(fb)
        if not isinstance(out, tuple):
            return out
        logits, *hidden = out
        fb.captured.update((i, h.clone()) for i, h in zip(fb.capture_layers, hidden))
        return logits


def captured_hidden(fb: ForwardBatch) -> Optional[torch.Tensor]:
    """[T, len(fb.capture_layers) * hidden] the hidden states the forward captured, in the order
    asked (left on the device); None when the batch asked for none."""
    if not fb.capture_layers:
        return None
    missing = [i for i in fb.capture_layers if i not in fb.captured]
    if missing:
        raise RuntimeError(f"the model did not capture hidden states of layers {missing} (kvyard.model_base)")
    parts = [fb.captured[i] for i in fb.capture_layers]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
