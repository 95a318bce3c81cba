"""A plain dense attention backend: gathers each request's whole KV and runs a masked softmax.

It implements only the core interface (kvyard.attention.AttentionBackend); slow but simple,
which makes it a handy reference for plugin authors."""
import torch

from kvyard.attention import AttentionBackend


class DenseAttentionBackend(AttentionBackend):
    name = "example_dense"

    def forward_extend(self, q, layer, fb):
        return self._attend(q, layer, fb, fb.extend_seq_lens_cpu)

    def forward_decode(self, q, layer, fb):
        return self._attend(q, layer, fb, [1] * fb.batch_size)

    def _attend(self, q, layer, fb, new_lens):
        k_buf, v_buf = fb.kv_pool.k_buffer(layer.layer_id), fb.kv_pool.v_buffer(layer.layer_id)
        group = layer.num_heads // layer.num_kv_heads
        out, start = [], 0
        for i, (n, total) in enumerate(zip(new_lens, fb.seq_lens_cpu)):
            slots = fb.req_to_token[fb.req_pool_indices[i], :total].long()
            k = k_buf[slots].repeat_interleave(group, dim=1).float()   # [total, H, D]
            v = v_buf[slots].repeat_interleave(group, dim=1).float()
            qi = q[start:start + n].float()                              # [n, H, D]
            scores = torch.einsum("nhd,thd->hnt", qi, k) * layer.scaling
            pos = torch.arange(total - n, total).unsqueeze(1)            # query positions
            mask = torch.arange(total).unsqueeze(0) > pos                # causal
            scores.masked_fill_(mask.unsqueeze(0), float("-inf"))
            o = torch.einsum("hnt,thd->nhd", scores.softmax(-1), v)
            out.append(o.reshape(n, -1).to(q.dtype))
            start += n
        return torch.cat(out)
