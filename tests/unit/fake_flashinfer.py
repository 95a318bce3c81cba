"""A pure-torch model of the part of flashinfer's API the `flashinfer` plugin uses, for CPU tests.

It follows the library's documented contract, and is strict where a real kernel would silently
read garbage:
  * page table: kv_indptr [B+1] / kv_indices [N] / kv_last_page_len [B], all int32; request i reads
    pages kv_indices[kv_indptr[i]:kv_indptr[i+1]] of the NHD cache [num_pages, page_size, Hkv, D],
    all of each page but the last, of which it reads kv_last_page_len[i] entries;
  * extend: qo_indptr [B+1]; with causal=True query j of a request with q_len new tokens and
    kv_len keys sees keys 0 .. kv_len - q_len + j (aligned to the end of its KV);
  * decode: one query per request;
  * sm_scale fixed at plan time, multiplied by run's q_scale;
  * graph mode (decode and prefill): the batch size is fixed by the buffers given to the
    constructor, plan copies the table (and qo_indptr) into them, and run reads the buffers,
    never plan's arguments.
Here, unlike the library, the host/device placement the plugin promises is asserted: indptr and
last_page_len on the host (planning never waits for the device), indices on the cache's device.
"""
from __future__ import annotations

from typing import Optional

import torch


def _check_int32(name: str, t: torch.Tensor, host: bool) -> None:
    assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
    if host:
        assert t.device.type == "cpu", f"{name} must be a host tensor"


class _PagedWrapper:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD"):
        assert kv_layout == "NHD", kv_layout
        assert float_workspace_buffer.dtype == torch.uint8
        self.device = float_workspace_buffer.device
        self.plans = 0
        self.runs = 0

    def _store_plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                    page_size, q_data_type, kv_data_type, sm_scale):
        _check_int32("kv_indptr", indptr, host=True)
        _check_int32("kv_last_page_len", last_page_len, host=True)
        _check_int32("kv_indices", indices, host=False)
        assert indices.device == self.device, "kv_indices must be on the workspace's device"
        assert indices.numel() == int(indptr[-1]), "kv_indices must hold exactly kv_indptr[-1] pages"
        assert bool(((last_page_len >= 1) & (last_page_len <= page_size)).all()), "last_page_len out of 1..page_size"
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size, self.q_dtype, self.kv_dtype = page_size, q_data_type, kv_data_type
        self.sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
        self.plans += 1

    def _attend(self, q, paged_kv_cache, qo_indptr, indptr, indices, last_page_len, causal,
                out: Optional[torch.Tensor], q_scale: Optional[float]) -> torch.Tensor:
        k_cache, v_cache = paged_kv_cache
        assert q.dtype == self.q_dtype and k_cache.dtype == self.kv_dtype, "dtypes differ from the plan"
        assert q.is_contiguous(), "q must be contiguous"
        assert k_cache.shape[1:] == (self.page_size, self.num_kv_heads, self.head_dim), k_cache.shape
        scale = self.sm_scale * (1.0 if q_scale is None else q_scale)
        group = self.num_qo_heads // self.num_kv_heads
        result = torch.empty(q.shape, dtype=torch.float32)
        ids = indices.cpu().long()
        for i in range(len(last_page_len)):
            pages = ids[int(indptr[i]):int(indptr[i + 1])]
            kv_len = (pages.numel() - 1) * self.page_size + int(last_page_len[i])
            k = k_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
            v = v_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
            rows = slice(int(qo_indptr[i]), int(qo_indptr[i + 1]))
            qi = q[rows].float()                                         # [n, H, D]
            scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
            if causal:
                n = qi.shape[0]
                allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - n, kv_len)[:, None]
                scores = scores.masked_fill(~allowed, float("-inf"))
            result[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        self.runs += 1
        if out is None:
            return result.to(q.dtype)
        assert out.shape == q.shape and out.dtype == q.dtype
        out.copy_(result)
        return out


class BatchPrefillWithPagedKVCacheWrapper(_PagedWrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
                 backend="auto", **_):
        super().__init__(float_workspace_buffer, kv_layout)
        self.backend = backend
        self.use_cuda_graph = use_cuda_graph
        if use_cuda_graph:
            bufs = (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
            for t in bufs:
                assert torch.is_tensor(t) and t.dtype == torch.int32
            assert qo_indptr_buf.numel() == paged_kv_indptr_buf.numel() == paged_kv_last_page_len_buf.numel() + 1
            self.fixed_batch_size = paged_kv_last_page_len_buf.numel()
            self.buffers = bufs

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, causal=False, sm_scale=None, q_data_type="float16",
             kv_data_type=None, **_):
        _check_int32("qo_indptr", qo_indptr, host=True)
        assert qo_indptr.numel() == paged_kv_indptr.numel()
        self._store_plan(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                         num_kv_heads, head_dim_qk, page_size, q_data_type, kv_data_type or q_data_type, sm_scale)
        self.causal = causal
        if self.use_cuda_graph:
            assert paged_kv_last_page_len.numel() == self.fixed_batch_size, "graph mode: the batch size is fixed"
            qo_buf, indptr_buf, indices_buf, last_buf = self.buffers
            assert paged_kv_indices.numel() <= indices_buf.numel(), "kv_indices exceed the graph buffer"
            qo_buf.copy_(qo_indptr)
            indptr_buf.copy_(paged_kv_indptr)
            indices_buf[:paged_kv_indices.numel()].copy_(paged_kv_indices)
            last_buf.copy_(paged_kv_last_page_len)
        else:
            self.table = (qo_indptr.clone(), paged_kv_indptr.clone(), paged_kv_indices.clone(),
                          paged_kv_last_page_len.clone())

    def run(self, q, paged_kv_cache, out=None, q_scale=None, **_):
        qo, indptr, indices, last = self.buffers if self.use_cuda_graph else self.table
        qo, indptr, last = qo.cpu(), indptr.cpu(), last.cpu()
        assert q.shape[0] == int(qo[-1]), "q rows differ from qo_indptr"
        return self._attend(q, paged_kv_cache, qo, indptr, indices, last, self.causal, out, q_scale)


class BatchDecodeWithPagedKVCacheWrapper(_PagedWrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False,
                 use_tensor_cores=False, paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto", **_):
        super().__init__(float_workspace_buffer, kv_layout)
        self.use_tensor_cores = use_tensor_cores
        self.use_cuda_graph = use_cuda_graph
        if use_cuda_graph:
            for t in (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer):
                assert torch.is_tensor(t) and t.dtype == torch.int32
            assert paged_kv_indptr_buffer.numel() == paged_kv_last_page_len_buffer.numel() + 1
            self.fixed_batch_size = paged_kv_last_page_len_buffer.numel()
            self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             sm_scale=None, q_data_type="float16", kv_data_type=None, **_):
        self._store_plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                         q_data_type, kv_data_type or q_data_type, sm_scale)
        if self.use_cuda_graph:
            assert last_page_len.numel() == self.fixed_batch_size, "graph mode: the batch size is fixed"
            indptr_buf, indices_buf, last_buf = self.buffers
            assert indices.numel() <= indices_buf.numel(), "kv_indices exceed the graph buffer"
            indptr_buf.copy_(indptr)
            indices_buf[:indices.numel()].copy_(indices)
            last_buf.copy_(last_page_len)
        else:
            self.table = (indptr.clone(), indices.clone(), last_page_len.clone())

    def run(self, q, paged_kv_cache, out=None, q_scale=None, **_):
        indptr, indices, last = self.buffers if self.use_cuda_graph else self.table
        indptr = indptr.cpu()
        assert q.shape[0] == last.numel(), "decode: one query per request"
        qo = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        return self._attend(q, paged_kv_cache, qo, indptr, indices, last.cpu(), False, out, q_scale)
