"""kvyard's own Triton attention kernels over the paged KV pool (used by the `triton` plugin).

Every kernel reads a request's keys through ``req_to_token[req_pool_indices[b], j]``, so the page
size is transparent, and launches once for the whole (mixed-length) batch.
  extend_attention   new tokens over cached prefix + themselves, causal, GQA
  decode_attention   one query per request: split-KV (flash-decoding) + a reduce launch
"""
