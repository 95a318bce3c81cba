"""Detokenization cost of one streamed completion, per token, at the start vs the end.

Feeds a TokenizerManager one scheduler update per token (no model: the ids are the default
model's tokenization of English text) and times each update through the HTTP stream path
(kvyard.server.running.stream_chunks: update -> decoded delta -> chunk). Cost that grows with
the output length shows as a larger per-token time at the end than at the start.

    OMP_NUM_THREADS=1 python benchmarks/detokenize_stream.py [--tokens 4096] [--window 256]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

TEXT = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill; "
        "numbers like 3.14159 and 2718 appear, as do names such as Zoë, Ångström and 東京. ")


class NullSocket:
    def send_pyobj(self, *_args, **_kw):
        pass


def build_tm(tokenizer):
    from kvyard.frontend.tokenizer_manager import TokenizerManager

    info = {"context_length": 1 << 20, "vocab_size": len(tokenizer)}
    tm = TokenizerManager(tokenizer, info, "inproc://unused", "inproc://unused", lambda: True)
    tm._send, tm._started = NullSocket(), True   # no scheduler: updates are fed by hand
    return tm


async def run(tokenizer, n_tokens: int) -> list[float]:
    from kvyard.scheduler.io_struct import ReqUpdate
    from kvyard.server.running import stream_chunks

    ids = tokenizer.encode(TEXT * (n_tokens // 20 + 1), add_special_tokens=False)[:n_tokens]
    tm = build_tm(tokenizer)
    reqs = tm.prepare({"input_ids": [1, 2, 3], "stream": True,
                       "sampling_params": {"max_new_tokens": n_tokens, "ignore_eos": True}})
    chunks = stream_chunks(tm, reqs)
    rid, times = reqs[0].rid, []
    first = asyncio.ensure_future(chunks.__anext__())
    await asyncio.sleep(0)   # submit the request
    for i, tid in enumerate(ids):
        done = i == len(ids) - 1
        start = time.perf_counter()
        tm._on_update(ReqUpdate(rid, [tid], {"type": "length", "length": n_tokens} if done else None,
                                3, i + 1, 0))
        chunk = await (first if i == 0 else chunks.__anext__())
        times.append(time.perf_counter() - start)
        assert chunk.ids == [tid]
    await chunks.aclose()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256, help="tokens averaged at each end")
    ns = ap.parse_args()
    from kvyard.model.source import default_model_path
    from kvyard.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    times = asyncio.run(run(tokenizer, ns.tokens))
    start = statistics.mean(times[:ns.window]) * 1e6
    end = statistics.mean(times[-ns.window - 1:-1]) * 1e6
    print(f"tokens={len(times)}  per-token us: first {ns.window} {start:.1f}  last {ns.window} {end:.1f}  "
          f"ratio {end / start:.2f}  total {sum(times):.3f}s")


if __name__ == "__main__":
    main()
