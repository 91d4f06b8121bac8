"""--buffer-device cpu on a GPU run: pinned host storage, asynchronous copies (trainer/h2d.py).

Needs CUDA (pinned memory and streams); skipped on the CPU-only CI, run by benchmarks/gpu_check.py.
"""
import pytest
import torch

from trainer.data.buffer import ActivationBuffer, Chunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, streams)")


class GpuSource:
    """Chunks produced on the GPU, as the LM produces them."""

    def __init__(self, n_chunks=12, rows=48, d=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        # made on the GPU up front: the source itself must not add host-to-device copies to what the
        # profiler sees while batches are served
        self.data = [torch.randn(rows, d, generator=g).cuda() for _ in range(n_chunks)]

    def __iter__(self):
        for i, x in enumerate(self.data):
            yield Chunk(x=x.clone(), cursor={"i": i})

    def load_state_dict(self, sd):
        pass


def _exchange():
    """The trainer's route in one process: the row exchange, two of the three 8-column blocks."""
    from trainer.parallel import RowExchange, RowNeed, init_parallel

    return RowExchange(init_parallel(1, device="cuda"), 8, [RowNeed(0, 1, (0, 2))], out_device="cuda")


def _batches(buffer_device, pin, exchange=None):
    buf = ActivationBuffer(GpuSource(), 192, 32, 24, device=buffer_device, pin_memory=pin, seed=3, out_device="cuda")
    out = []
    try:
        while True:
            try:
                got = buf.next_batch(exchange)
            except StopIteration:
                return out
            out.append({c: t.clone() for c, t in got.items()} if isinstance(got, dict) else got.clone())
    finally:
        buf.close()


def test_cpu_buffer_serves_the_same_batches_as_a_gpu_buffer():
    """Same rows, same order: the default gather and the trainer's row exchange."""
    a = _batches("cuda", False)
    b = _batches("cpu", True)
    assert len(a) == len(b) == 12 * 48 // 32
    for x, y in zip(a, b):
        assert x.is_cuda and y.is_cuda and torch.equal(x, y)
    ea = _batches("cuda", False, _exchange())
    eb = _batches("cpu", True, _exchange())
    assert len(ea) == len(eb) == len(a)
    for x, da, db in zip(a, ea, eb):
        assert set(da) == set(db) == {0, 2}
        for c in (0, 2):
            assert db[c].is_cuda and torch.equal(da[c], db[c]) and torch.equal(db[c], x[:, 8 * c : 8 * c + 8])


def test_cpu_buffer_copies_are_async_from_pinned_memory_on_side_streams():
    """Every host-to-device copy of a batch comes from pinned memory, on a stream other than the
    training stream (the old code copied from pageable index_select output, synchronously); the
    producer's device-to-host copies land in pinned memory."""
    from torch.profiler import ProfilerActivity, profile

    buf = ActivationBuffer(GpuSource(), 192, 32, 24, device="cpu", pin_memory=True, seed=3, out_device="cuda")
    try:
        buf.next_batch()
        ex = _exchange()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(6):
                x = buf.next_batch() if i % 2 else buf.next_batch(ex)[2]
                (x * 2).sum()
            torch.cuda.synchronize()
    finally:
        buf.close()
    events = prof.events()
    copies = [e for e in events if "Memcpy HtoD" in e.name]
    assert copies, sorted({e.name for e in events})[:50]
    assert all("Pinned" in e.name for e in copies), sorted({e.name for e in copies})
    # CUPTI stream ids on both sides (torch's Stream.stream_id numbers streams differently): the
    # training thread's own kernels (the sum) run on the training stream, the copies elsewhere
    train = {e.device_resource_id for e in events if "reduce_kernel" in e.name}
    assert train, sorted({e.name for e in events})[:50]
    streams = {e.device_resource_id for e in copies}
    assert not streams & train, f"batch copies on the training stream: copies {streams}, training {train}"
    d2h = [e for e in prof.events() if "Memcpy DtoH" in e.name]
    assert all("Pinned" in e.name for e in d2h), sorted({e.name for e in d2h})
