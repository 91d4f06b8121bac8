"""ActivationBuffer: exactly-once consumption, shuffling, refill at half, errors, shutdown, resume, and the
same global buffer whatever the number of ranks (slot layout, shares, resume in another layout)."""
import random
import threading
import time

import pytest
import torch

from trainer.data.buffer import ActivationBuffer, Chunk, ProducerError


class CountingSource:
    """Rows whose every entry is the row's global id; chunks of varying size; resumable cursor."""

    def __init__(self, n_rows, chunk_sizes=(7, 3, 11), d=4, fail_at=None, jitter=0.0, rank=None, world=1):
        self.n_rows, self.sizes, self.d = n_rows, chunk_sizes, d
        self.fail_at, self.jitter = fail_at, jitter
        self.rank, self.world = rank, world  # rank set: deal chunk c to rank c % world, like ActivationSource
        self.chunk = 0
        self.log = []  # (chunk index, buffer.produced at the time) when a chunk is handed over
        self.buffer = None

    def _start(self, c):
        return sum(self.sizes[i % len(self.sizes)] for i in range(c))

    def load_state_dict(self, sd):
        self.chunk = sd["chunk"]

    def __iter__(self):
        while True:
            c = self.chunk
            start = self._start(c)
            if start >= self.n_rows:
                return
            if self.fail_at is not None and c == self.fail_at:
                raise RuntimeError("boom in the producer")
            n = min(self.sizes[c % len(self.sizes)], self.n_rows - start)
            if self.jitter:
                time.sleep(random.random() * self.jitter)
            ids = torch.arange(start, start + n, dtype=torch.float32)
            x = ids[:, None].expand(n, self.d).clone()
            self.chunk = c + 1
            if self.buffer is not None:
                self.log.append((c, self.buffer.produced))
            if self.rank is None:
                yield Chunk(x, None, {"chunk": c})
            else:
                owner = c % self.world
                yield Chunk(x if owner == self.rank else None, None, {"chunk": c}, row0=start, n=n, owner=owner)


def ids_of(x):
    assert (x == x[:, :1]).all(), "rows were mixed up"
    return x[:, 0].long().tolist()


def drain(buf):
    out = []
    for b in buf:
        out.extend(ids_of(b))
    return out


def test_every_row_consumed_exactly_once_and_shuffled():
    buf = ActivationBuffer(CountingSource(500), capacity=64, batch_size=8, width=4, seed=0)
    with buf:
        got = drain(buf)
    assert sorted(got) == list(range(500)), f"{len(got)} rows, {len(set(got))} distinct"
    assert got != sorted(got)
    # shuffling is real: consecutive ids rarely stay adjacent
    adjacent = sum(1 for a, b in zip(got, got[1:]) if b == a + 1)
    assert adjacent < 25, adjacent


def test_first_fill_consumed_once_before_any_new_row():
    cap, bs = 64, 8
    buf = ActivationBuffer(CountingSource(1000), capacity=cap, batch_size=bs, width=4, seed=1)
    with buf:
        first_round = [i for _ in range(cap // 2 // bs) for i in ids_of(buf.next_batch())]
        # round 0 serves half of the first fill, all distinct, none from the refill
        assert len(set(first_round)) == cap // 2
        assert max(first_round) < cap
        second_round = [i for _ in range(cap // 2 // bs) for i in ids_of(buf.next_batch())]
    # after the half-way reshuffle the refilled rows (ids cap..cap+31) are eligible
    assert any(i >= cap for i in second_round)
    assert not set(first_round) & set(second_round)
    # the 32 first-fill rows not served in round 0 and the 32 new rows make up round 1's pool
    assert all(i < cap + cap // 2 for i in second_round)


def test_refill_waits_for_half_and_memory_is_bounded():
    cap, bs = 64, 8
    src = CountingSource(10_000, chunk_sizes=(4,))
    buf = ActivationBuffer(src, capacity=cap, batch_size=bs, width=4, seed=2)
    src.buffer = buf
    with buf:
        buf.next_batch()
        time.sleep(0.2)
        # one batch consumed: the producer may only write into those 8 freed slots
        assert buf.produced <= cap + bs
        for _ in range(cap // 2 // bs - 1):
            buf.next_batch()
        deadline = time.time() + 5
        while buf.produced < cap + cap // 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        # half consumed -> exactly half refilled, nothing more until the next round is consumed
        assert buf.produced == cap + cap // 2
        assert buf.round == 0
        buf.next_batch()
        assert buf.round == 1
    # the producer never ran more than one chunk ahead of the free slots
    for c, produced in src.log:
        assert c * 4 <= produced + 4 + bs


def test_producer_error_reaches_consumer():
    buf = ActivationBuffer(CountingSource(10_000, fail_at=30), capacity=32, batch_size=8, width=4, seed=0)
    with buf, pytest.raises(ProducerError, match="boom in the producer") as ei:
        for _ in range(1000):
            buf.next_batch()
    assert isinstance(ei.value.__cause__, RuntimeError)


def test_error_before_first_fill_reaches_first_rows():
    buf = ActivationBuffer(CountingSource(10_000, fail_at=0), capacity=32, batch_size=8, width=4)
    with buf, pytest.raises(ProducerError):
        buf.first_rows(16)


def test_close_stops_a_blocked_producer():
    buf = ActivationBuffer(CountingSource(10**9), capacity=32, batch_size=8, width=4)
    buf.next_batch()
    time.sleep(0.05)
    thread = buf._thread
    assert thread.is_alive()  # blocked: no free slot
    t0 = time.time()
    buf.close(timeout=5)
    assert not thread.is_alive() and time.time() - t0 < 2
    assert not [t for t in threading.enumerate() if t.name == "activation-producer" and t is thread]


def test_order_is_independent_of_producer_timing():
    seqs = []
    for jitter in (0.0, 0.003):
        buf = ActivationBuffer(CountingSource(300, jitter=jitter), capacity=48, batch_size=8, width=4, seed=5)
        with buf:
            seqs.append(drain(buf))
    assert seqs[0] == seqs[1]


@pytest.mark.parametrize("stop_after", [1, 3, 4, 9])
def test_state_dict_resume_continues_the_same_sequence(stop_after):
    full = ActivationBuffer(CountingSource(400), capacity=48, batch_size=8, width=4, seed=3)
    with full:
        ref = [ids_of(b) for b in full]
    a = ActivationBuffer(CountingSource(400), capacity=48, batch_size=8, width=4, seed=3)
    with a:
        head = [ids_of(a.next_batch()) for _ in range(stop_after)]
        time.sleep(0.02)  # let the producer write some refill rows before the snapshot
        meta, rows = a.state_dict()
    b = ActivationBuffer(CountingSource(400), capacity=48, batch_size=8, width=4, seed=3)
    b.load_state_dict(meta, reader(rows))
    with b:
        tail = [ids_of(x) for x in b]
    assert head + tail == ref


def test_first_rows_are_the_stream_prefix():
    buf = ActivationBuffer(CountingSource(200), capacity=32, batch_size=8, width=4, seed=0)
    with buf:
        x0, n = buf.first_rows(10)
        assert n == 10 and x0[:, 0].tolist() == list(range(10))
        x1, n = buf.first_rows(100)
        assert n == 32 and x1[:, 0].tolist() == list(range(32))  # at most the buffer


def test_first_rows_of_a_dataset_shorter_than_asked_are_what_it_holds():
    """A dataset of 13 rows, 20 asked (buffer of 32): 13 rows, counted as 13, and the dataset norm is the
    mean over exactly those rows (an overstated count would divide by 20 or average unwritten slots)."""
    from trainer.config import MemberSpec
    from trainer.members import Columns, dataset_norms
    from trainer.parallel import ParallelContext

    buf = ActivationBuffer(CountingSource(13, d=4), capacity=32, batch_size=8, width=4, seed=0)
    with buf:
        x, n = buf.first_rows(20)
        assert n == 13 and x[:, 0].tolist() == list(range(13))
        x, n = buf.first_rows(5)  # still the prefix when fewer than the data are asked
        assert n == 5 and x[:, 0].tolist() == list(range(5))
    spec = MemberSpec(1, "R", 8)
    buf = ActivationBuffer(CountingSource(13, d=4), capacity=32, batch_size=8, width=4, seed=0)
    with buf:
        norms, mu, n = dataset_norms(buf, ParallelContext(), Columns([spec.site]), [spec], 20, d_model=4)
    want = sum(2.0 * j for j in range(13)) / 13  # row j is j in each of 4 columns: norm 2j
    assert n == 13 and norms[spec.name] == {"in": want, "out": want, "tokens": 13}
    assert mu == {"blocks.1.hook_resid_post": want}


def test_short_source_is_drained():
    buf = ActivationBuffer(CountingSource(13), capacity=32, batch_size=8, width=4)
    with buf:
        got = drain(buf)
    assert sorted(got) == list(range(13))


def test_rejects_tiny_capacity():
    with pytest.raises(ValueError, match="--buffer-tokens"):
        ActivationBuffer(CountingSource(10), capacity=8, batch_size=8, width=4)


def reader(*shards):
    """read_rows over in-memory shards (what the trainer reads from the checkpoint's safetensors files)."""
    def read(slots):
        have = torch.cat([s["slots"] for s in shards])
        rows = torch.cat([s["rows"] for s in shards])
        order = have.argsort()
        have, rows = have[order], rows[order]
        idx = torch.searchsorted(have, slots)
        assert torch.equal(have[idx], slots)
        return rows[idx]
    return read


def lockstep(bufs, steps):
    """Step the buffers of every rank together; each step's rows, assembled from the rank holding each
    of them (what RowExchange does with one all_to_all), in batch order. Checks that every rank has the
    same slot table."""
    out = []
    for _ in range(steps):
        seen = []
        for buf in bufs:
            def grab(X, owners, lids):  # copy inside: once next_batch returns, the producer may reuse rows
                seen.append((owners.clone(), lids.clone(), X[lids.clamp_min(0)].clone()))
                return None
            buf.next_batch(grab)
        owners = seen[0][0]
        assert all(torch.equal(o, owners) for o, _, _ in seen), "ranks disagree on who holds the batch's rows"
        rows = torch.empty(len(owners), 4)
        for r, (o, lids, got) in enumerate(seen):
            mine = o == r
            assert (lids[mine] >= 0).all() and (lids[~mine] == -1).all()
            rows[mine] = got[mine]
        out.append(rows[:, 0].long().tolist())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_the_global_buffer_is_the_same_on_any_number_of_ranks(world):
    """Each rank stores only the chunks dealt to it, yet the batches are row for row the one-process ones;
    the shares stay near capacity / world (plus the rare growth) and every row is read exactly once."""
    ref = ActivationBuffer(CountingSource(700), capacity=64, batch_size=8, width=4, seed=11)
    with ref:
        want = [ids_of(ref.next_batch()) for _ in range(60)]
    bufs = [ActivationBuffer(CountingSource(700, rank=r, world=world), capacity=64, batch_size=8, width=4,
                             seed=11, rank=r, world=world) for r in range(world)]
    try:
        got = lockstep(bufs, 60)
        assert got == want
        assert sum(b.produced for b in bufs) <= 700 and min(b.produced for b in bufs) > 0
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize("before,after", [(1, 2), (2, 3), (3, 1)])
def test_a_checkpoint_of_one_layout_resumes_in_another(before, after):
    ref = ActivationBuffer(CountingSource(600), capacity=48, batch_size=8, width=4, seed=4)
    with ref:
        want = [ids_of(ref.next_batch()) for _ in range(50)]
    mk = lambda r, w: ActivationBuffer(CountingSource(600, rank=r if w > 1 else None, world=w), capacity=48,
                                       batch_size=8, width=4, seed=4, rank=r, world=w)
    bufs = [mk(r, before) for r in range(before)]
    head = lockstep(bufs, 17)
    time.sleep(0.02)
    states = [b.state_dict() for b in bufs]
    for b in bufs:
        b.close()
    assert all(torch.equal(s[0]["perm"], states[0][0]["perm"]) for s in states)
    new = [mk(r, after) for r in range(after)]
    for b in new:
        b.load_state_dict(states[0][0], reader(*[s[1] for s in states]))
    try:
        tail = lockstep(new, 33)
    finally:
        for b in new:
            b.close()
    assert head + tail == want
