"""The data-parallel controller's dispatch over real ZMQ sockets: requests spread by policy,
aborts reach the owning replica, control messages reach every replica, finishes release."""
import asyncio
import tempfile

import pytest
import zmq
import zmq.asyncio

from kvyard.frontend.dp_controller import DataParallelController
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.io_struct import AbortReq, BatchTokenOut, ReqUpdate, TokenizedGenerateReq


def make_req(rid, ids):
    return TokenizedGenerateReq(rid=rid, input_ids=ids, sampling_params=SamplingParams())


def run(method, body):
    async def main():
        d = tempfile.mkdtemp()
        ctx = zmq.asyncio.Context()
        sends, recvs = [f"ipc://{d}/s{i}" for i in range(2)], [f"ipc://{d}/r{i}" for i in range(2)]
        ctrl = DataParallelController(ctx, sends, recvs, method)
        replicas = []
        for a in sends:
            s = ctx.socket(zmq.PULL)
            s.connect(a)
            replicas.append(s)
        outs = []
        for a in recvs:
            s = ctx.socket(zmq.PUSH)
            s.connect(a)
            outs.append(s)
        try:
            await body(ctrl, replicas, outs)
        finally:
            ctrl.close()
            for s in replicas + outs:
                s.close(0)
            ctx.term()
    asyncio.run(asyncio.wait_for(main(), 20))


async def drain(sock):
    got = []
    while await sock.poll(200):
        got.append(await sock.recv_pyobj())
    return got


def test_round_robin_abort_and_broadcast():
    async def body(ctrl, replicas, outs):
        for i in range(4):
            ctrl.send_pyobj(make_req(f"r{i}", [1, 2, i]))
        ctrl.send_pyobj(AbortReq("r1"))
        ctrl.send_pyobj("shutdown")
        got = [await drain(r) for r in replicas]
        assert [m.rid for m in got[0][:2]] == ["r0", "r2"] and got[0][2] == "shutdown"
        assert [getattr(m, "rid", m) for m in got[1]] == ["r1", "r3", "r1", "shutdown"]  # the abort went to its owner
        assert set(ctrl.owner) == {"r0", "r2", "r3"}
        update = ReqUpdate("r3", [5], {"type": "stop"}, 3, 1, 0)
        outs[1].send_pyobj(BatchTokenOut([update]))
        assert (await ctrl.recv_pyobj()).updates[0].rid == "r3"
        assert set(ctrl.owner) == {"r0", "r2"} and [r.load for r in ctrl.replicas] == [2, 0]
    run("round_robin", body)


def test_cache_aware_follows_token_prefixes():
    async def body(ctrl, replicas, outs):
        family_a, family_b = list(range(100, 140)), list(range(200, 240))
        for i in range(3):
            ctrl.send_pyobj(make_req(f"a{i}", family_a + [i]))
            ctrl.send_pyobj(make_req(f"b{i}", family_b + [i]))
        got = [[m.rid[0] for m in await drain(r)] for r in replicas]
        assert sorted(map(set, got), key=sorted) == [{"a"}, {"b"}]
    run("cache_aware", body)


def test_unknown_method():
    with pytest.raises(ValueError, match="load_balance_method"):
        DataParallelController(zmq.asyncio.Context(), [], [], "minimum_tokens")
