"""Messages between real processes over torch.distributed (gloo): content, ordering, timeouts, loopback only."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline_stages.transport import Header, Link, LinkTimeout, MsgKind

pytestmark = pytest.mark.integration


def test_header_round_trip():
    h = Header(MsgKind.BLOCK, session_no=3, block_index=75_001, flags=5,
               specs=((torch.bfloat16, (1, 16, 3, 48, 88)), (torch.float32, (25, 1024, 12))))
    assert Header.decode(h.encode()) == h
    with pytest.raises(ValueError, match="at most"):
        Header(MsgKind.BLOCK, specs=((torch.float32, (1,) * 6),)).encode()


def _worker(rank: int, path: str, q) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    link = Link(torch.device("cpu"), timeout_s=10)
    try:
        if rank == 0:
            g = torch.Generator().manual_seed(1)
            for b in range(5):
                lat = torch.randn(1, 16, 3, 6, 8, generator=g).to(torch.bfloat16)
                aud = torch.randn(5, 32, 12, generator=g)
                link.send(1, Header(MsgKind.BLOCK, 7, b), [lat, aud])
            link.send(1, Header(MsgKind.SHUTDOWN, 7, 5))
            link.flush()
            q.put(("sent", 0))
            time.sleep(3)  # stay alive but silent: the peer's next recv must time out
        else:
            g = torch.Generator().manual_seed(1)
            ok = True
            for b in range(5):
                m = link.recv(0)
                lat = torch.randn(1, 16, 3, 6, 8, generator=g).to(torch.bfloat16)
                aud = torch.randn(5, 32, 12, generator=g)
                ok &= m.header.kind == MsgKind.BLOCK and m.header.block_index == b and m.header.session_no == 7
                ok &= torch.equal(m.tensors[0], lat) and torch.equal(m.tensors[1], aud)
                ok &= m.tensors[0].dtype == torch.bfloat16
            ok &= link.recv(0).header.kind == MsgKind.SHUTDOWN
            t0 = time.monotonic()
            try:
                link.recv(0, timeout_s=1.0)
                q.put(("timeout", None))
            except LinkTimeout as exc:
                q.put(("timeout", (round(time.monotonic() - t0, 1), exc.peer)))
            q.put(("ok", bool(ok)))
    finally:
        q.close()
        q.join_thread()  # flush the queue's feeder thread before the hard exit
        os._exit(0)


def test_blocks_arrive_intact_in_order_and_a_silent_peer_times_out(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "rdv"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in range(3))
    for p in procs:
        p.join(timeout=30)
    assert results["ok"] is True
    waited, peer = results["timeout"]
    assert peer == 0 and 0.9 <= waited <= 3.0
