"""etcd differential test at a small --max-request-bytes: where watch responses fragment.

etcd's watch server splits a response with `fragment` only above --max-request-bytes
plus gRPC's 512 KiB allowance (v3rpc's grpcOverheadBytes). A real etcd and a shmwatch
broker, both at --max-request-bytes 10000, replay the same 64 revisions of 9 KB values
to a catch-up watch with and without `fragment`: the responses must match, fragment by
fragment (how many events each, the fragment flags, header revisions, the events)."""

from __future__ import annotations

import pytest

import broker
import clientlib
from tests.etcd_support import SKIP_REASON, etcd_binary, start_etcd

LIMIT = 10_000
N = 64
VALUE = b"f" * 9_000


def transcript(c, fragment: bool) -> list:
    for i in range(N):
        c.put(f"f/{i:02d}", VALUE + b"%02d" % i)
    out = []
    w = c.watch("f/", prefix=True, start_revision=2, fragment=fragment)
    first = w.get(10)
    out.append(("created", first.created, first.canceled))
    seen = 0
    while seen < N:
        r = w.get(10)
        seen += len(r.events)
        out.append((r.revision, r.fragment, len(r.events),
                    [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in r.events]))
    return out


@pytest.fixture(scope="module")
def etcd_transcripts():
    binary = etcd_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    out = {}
    for fragment in (True, False):
        server = start_etcd(binary, extra_args=("--max-request-bytes", str(LIMIT)))
        try:
            c = server.client(timeout=10)
            out[fragment] = transcript(c, fragment)
            c.close()
        finally:
            server.stop()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fragment", [True, False])
def test_fragments_match_etcd_at_a_small_max_request_bytes(etcd_transcripts, fragment):
    want = etcd_transcripts[fragment]
    with broker.spawn(max_request_bytes=LIMIT) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        got = transcript(c, fragment)
    shape = lambda t: [x[:3] for x in t]  # noqa: E731
    assert shape(got) == shape(want)
    assert got == want
    if fragment:
        # What etcd does here (recorded on etcd 3.4.23): 59 events, then the other 5.
        assert [x[2] for x in want[1:]] == [59, 5] and [x[1] for x in want[1:]] == [True, False]
    else:
        assert [x[2] for x in want[1:]] == [N]
