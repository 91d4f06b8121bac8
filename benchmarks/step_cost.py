"""The bytes and FLOPs of every pass of one training step, counted from the code (never timed).

    python benchmarks/step_cost.py                      # d 4096, d_sae 32768, k 50, 4096 tokens, bf16
    python benchmarks/step_cost.py --n 131072 --json OUT.json

Runs the trainer's ``SAEStep`` as a GPU run configures it (bf16 compute copies of fp32 masters,
``SAEAdam``, Llama Scope loss, gradient clipping, decoder-norm-weighted TopK, the Triton path) at a
small shape with the same structure, on the CPU under the Triton interpreter, and records its second
step: every PyTorch operator (a ``TorchDispatchMode``; the interpreter's own copies excluded) and
every Triton launch. Each tensor's size is then rescaled from the small shape to the requested one
(its element count is a product of the small B, d, n, k, which are chosen so that every product is
distinct), and the passes are listed with

* ``bytes``: every tensor the pass reads or writes, once (what it must move through HBM if nothing
  stays in L2 between passes; a lower bound for the pass itself);
* ``gathered``: rows read through an index (the sparse kernels' gathers; L2 hits or HBM reads);
* ``flops``: matrix-multiply FLOPs (2 M N K), and the sparse kernels' useful multiply-adds.

The K-annealing start (k = d_model / 2) and AuxK change the picture; ``--k`` shows them. At k >= the
dense threshold the decode and backward run as cuBLAS GEMMs, which this count shows too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SAE_KERNELS_BACKEND"] = "triton"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

# The small shape: every product of these (and n + 1) is a distinct number. m (AuxK's candidates) is
# set from the dead fraction; ka = d / 2 is the recipe's k_aux.
SMALL = dict(B=96, d=40, n=520, k=5)
# Operators that only make views or allocate (no data moved).
_FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "expand", "slice", "select", "as_strided",
         "alias", "detach", "unsqueeze", "squeeze", "permute", "empty", "empty_like", "empty_strided",
         "lift_fresh", "_reshape_alias", "unbind", "split", "split_with_sizes", "_local_scalar_dense",
         "new_empty", "new_empty_strided", "set_", "resize_", "_record_function_enter_new",
         "_record_function_exit"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
# In-place operators that overwrite their destination without reading it (others, add_, mul_, ...,
# read it too).
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "index_copy_"}


def _monomials(s: Dict[str, int]) -> Dict[int, Tuple[str, Any]]:
    """numel at the small shape -> (symbol, function of the target shape). ``m``: AuxK's candidate
    latents, ``ka``: k_aux (the recipe's d_model / 2)."""
    B, d, n, k, m, ka = s["B"], s["d"], s["n"], s["k"], s["m"], s["ka"]
    entries = [
        (1, "1", lambda t: 1), (B, "B", lambda t: t["B"]), (d, "d", lambda t: t["d"]), (n, "n", lambda t: t["n"]),
        (k, "k", lambda t: t["k"]), (B * d, "B*d", lambda t: t["B"] * t["d"]),
        (n * d, "n*d", lambda t: t["n"] * t["d"]), (B * n, "B*n", lambda t: t["B"] * t["n"]),
        (B * k, "B*k", lambda t: t["B"] * t["k"]), (n + 1, "n+1", lambda t: t["n"] + 1),
        (2, "2", lambda t: 2), (4, "4", lambda t: 4),
        (2 * n * d + n + d, "params", lambda t: 2 * t["n"] * t["d"] + t["n"] + t["d"]),
    ]
    if m:
        entries += [(m, "m", lambda t: t["m"]), (B * m, "B*m", lambda t: t["B"] * t["m"]),
                    (m * d, "m*d", lambda t: t["m"] * t["d"]), (ka, "ka", lambda t: t["ka"]),
                    (B * ka, "B*ka", lambda t: t["B"] * t["ka"])]
    table = {ne: (sym, f) for ne, sym, f in entries}
    assert len(table) == len(entries), "the small shape's products collide"
    return table


class _Trace(TorchDispatchMode):
    def __init__(self, where):
        super().__init__()
        self.where = where
        self.ops: List[Dict[str, Any]] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        where, phase = self.where()
        rows = _row_op(name, args, out)
        if rows is not None:  # touches some rows of a large tensor, not all of it
            self.ops.append(dict(kind="op", op=name, where=where, phase=phase, reads=rows[0], writes=rows[1]))
            return out
        ins, _ = tree_flatten((args, kwargs))
        outs, _ = tree_flatten(out)
        reads = [t for t in ins if isinstance(t, torch.Tensor)]
        writes = [t for t in outs if isinstance(t, torch.Tensor)]
        written = {id(t) for t in writes}
        if "out" in kwargs or name in _OVERWRITE:  # the destination is written, not read
            reads = [t for t in reads if id(t) not in written]
        reads = list({id(t): t for t in reads}.values())
        self.ops.append(dict(kind="op", op=name, where=where, phase=phase,
                             reads=[(t.numel(), t.element_size(), tuple(t.shape)) for t in reads],
                             writes=[(t.numel(), t.element_size(), tuple(t.shape)) for t in writes]))
        return out


def _desc(t: torch.Tensor) -> Tuple[int, int, tuple]:
    return (t.numel(), t.element_size(), tuple(t.shape))


def _row_op(name: str, args, out):
    """(reads, writes) of an operator that gathers or writes whole rows of a larger tensor through an
    index along dim 0 (``index_select(W, 0, ids)``, ``W[ids]``, ``W[ids] = v``): the rows it touches
    and the index, not the whole tensor. None for any other operator (a column gather, ``index_select``
    along dim 1, reads whole rows: counted in full)."""
    if name == "index_select" and len(args) >= 3 and args[1] == 0:
        return [_desc(out), _desc(args[2])], [_desc(out)]
    if name == "index" and len(args) >= 2 and len(args[1]) == 1 and args[1][0] is not None:
        return [_desc(out), _desc(args[1][0])], [_desc(out)]
    if name == "index_add_" and len(args) >= 4 and args[1] == 0:  # reads and writes the rows, reads the source
        return [_desc(args[3]), _desc(args[3]), _desc(args[2])], [_desc(args[3])]
    if name in ("index_put_", "index_put") and len(args) >= 3 and len(args[1]) == 1 and args[1][0] is not None:
        values, idx = args[2], args[1][0]
        accumulate = len(args) > 3 and bool(args[3])
        reads = [_desc(values), _desc(idx)] + ([_desc(values)] if accumulate else [])
        return reads, [_desc(values)]
    return None


# (file, qualified function) of the frames that decide a pass's phase, searched from the innermost
# frame out; AuxK's own passes are told apart from the main path's.
_PHASES = {
    ("ops.py", "_DenseFromPre.backward"): "3a AuxK backward", ("ops.py", "_SubsetDecode.backward"): "3a AuxK backward",
    ("ops.py", "RowGrads.add_to"): "3a AuxK backward",
    ("step.py", "SAEStep.auxk_loss"): "2a AuxK forward", ("step.py", "SAEStep.aux_candidates"): "2a AuxK forward",
    ("step.py", "SAEStep.row_flags"): "5a Adam row flags",
    ("ops.py", "_encode_backward"): "3 backward (SAE ops)", ("ops.py", "_TopKEncode.backward"): "3 backward (SAE ops)",
    ("ops.py", "_SparseDecode.backward"): "3 backward (SAE ops)",
    ("mesh.py", "ParallelContext.grad_norm"): "4 clip norm",
    ("optim.py", "SAEAdam.step"): "5 optimizer", ("optim.py", "SAEAdam._kernel_step"): "5 optimizer",
    ("step.py", "SAEStep.encode_decode"): "1 forward (SAE ops)",
}
_LOSS = "2 loss, metrics, bookkeeping (step.py)"


def _where() -> Tuple[str, str]:
    """(file:function of the innermost frame of this repository, the phase of the step) of the
    operator being dispatched."""
    f = sys._getframe(2)
    where, phase = None, None
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(str(REPO)) and "step_cost.py" not in fn and not f.f_code.co_name.startswith("<"):
            name = Path(fn).name
            qual = getattr(f.f_code, "co_qualname", f.f_code.co_name)
            where = where or f"{name}:{f.f_code.co_name}"
            phase = phase or _PHASES.get((name, qual))
        f = f.f_back
    return where or "?", phase or _LOSS


def _step_config(small: Dict[str, int], recipe: bool):
    """The traced step's StepConfig: the bare step (Llama Scope loss, clipping, nothing else), or the
    default recipe as a GPU run resolves it (``TrainConfig.resolve(..., "cuda")`` ->
    ``StepConfig.from_train_config``: AuxK with k_aux = d / 2, the Adam row flags), in its annealed
    phase (k = the target k) with AuxK's candidates refreshed every 64 steps as on a GPU."""
    import dataclasses

    from trainer.config import TrainConfig
    from trainer.train import StepConfig

    B, d, n, k = small["B"], small["d"], small["n"], small["k"]
    if not recipe:
        return StepConfig(k=k, k_start=k, total_steps=10 ** 6, anneal_steps=0, warmup_steps=1, decay_fraction=0.2,
                          lr=8e-4, clip_grad_norm=1e-3, compute_dtype=torch.bfloat16)
    cfg = TrainConfig(model="traced/llama", layer=0, tokens=10 ** 6 * B, batch_size=B, expansion=n // d, k=k)
    cfg = cfg.resolve(1, d, "cuda")
    sc = StepConfig.from_train_config(cfg, compute_dtype=torch.bfloat16)
    return dataclasses.replace(sc, k_start=k, anneal_steps=0, warmup_steps=1, aux_refresh_steps=64)


def trace_step(small: Dict[str, int], moments_dtype: Optional[torch.dtype] = None,
               recipe: bool = False) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The ops and launches of one traced step (the second), and what the step ran with."""
    from triton.runtime import interpreter

    from sae_kernels import SAEConfig, TopKSAE, ops
    from trainer.train import SAEStep, make_optimizer

    B, d, n, k = small["B"], small["d"], small["n"], small["k"]
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k, norm_in=0.37, norm_out=0.37))
    sae.check_inputs = False
    opt = make_optimizer(sae, 8e-4, (0.9, 0.9999), moments_dtype=moments_dtype)
    sc = _step_config(small, recipe)
    st = SAEStep(sae, opt, sc)
    info = {k_: v for k_, v in dataclasses_asdict(sc).items() if k_ != "compute_dtype"}
    if recipe and small["m"]:  # m latents dead since long before: AuxK's candidates
        st.since_fired[:small["m"]] = 100 * sc.dead_window_tokens
    x = torch.randn(B, d).to(torch.bfloat16)  # the buffer holds bf16 activations in a GPU run
    real_free = ops._host_sync_free
    ops._host_sync_free = lambda t: False  # the GPU route (no host reads inside the step)
    try:
        st(x, None, 0)  # first step: SAEAdam builds its copies and moments; AuxK's candidates refreshed
        info["candidates"] = 0 if st._aux_ids is None else int(st._aux_ids.numel())
        tr = _Trace(_where)
        real = interpreter.GridExecutor.__call__

        def launch(self, *a, **kw):
            tensors = [(t.numel(), t.element_size(), tuple(t.shape)) for t in a if isinstance(t, torch.Tensor)]
            where, phase = _where()
            tr.ops.append(dict(kind="kernel", op=self.fn.__name__, where=where, phase=phase, tensors=tensors,
                               constexprs={kk: v for kk, v in kw.items() if isinstance(v, (bool, int))}))
            tr.paused += 1  # the interpreter's host copies are not the kernel's traffic
            try:
                return real(self, *a, **kw)
            finally:
                tr.paused -= 1

        from sae_kernels import triton_ops

        real_mm, real_ops_mm = triton_ops._mm, ops.mm_out

        def gpu_mm(a_, b_, out_dtype):
            """What ``_mm`` does on CUDA: one cuBLAS GEMM writing ``out_dtype`` (the CPU emulates it)."""
            where, phase = _where()
            tr.ops.append(dict(kind="op", op="mm", where=where, phase=phase,
                               reads=[(a_.numel(), a_.element_size(), tuple(a_.shape)),
                                      (b_.numel(), b_.element_size(), tuple(b_.shape))],
                               writes=[(a_.shape[0] * b_.shape[1], torch.empty((), dtype=out_dtype).element_size(),
                                        (a_.shape[0], b_.shape[1]))]))
            tr.paused += 1
            try:
                return real_mm(a_, b_, out_dtype)
            finally:
                tr.paused -= 1

        interpreter.GridExecutor.__call__ = launch
        triton_ops._mm = ops.mm_out = gpu_mm
        try:
            with tr:
                st(x, None, 1)
        finally:
            interpreter.GridExecutor.__call__ = real
            triton_ops._mm = real_mm
            ops.mm_out = real_ops_mm
    finally:
        ops._host_sync_free = real_free
    return tr.ops, info


def dataclasses_asdict(obj) -> Dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _kernel_cost(op: Dict[str, Any], size) -> Tuple[float, float, float]:
    """(bytes once, gathered bytes, flops) of one Triton launch at the target shape."""
    t = [(size(ne), es) for ne, es, _ in op["tensors"]]
    name = op["op"]
    nb = lambda i: t[i][0] * t[i][1]  # noqa: E731
    tgt = size.target
    B, d, k = tgt["B"], tgt["d"], tgt["k"]
    if name == "_row_topk_kernel":  # pre, bias|dummy, norm|dummy, values, indices
        c = op["constexprs"]
        return nb(0) + (nb(1) if c.get("HAS_BIAS") else 0) + (nb(2) if c.get("HAS_NORM") else 0) + nb(3) + nb(4), 0, 0
    if name == "_gather_rows_kernel":  # out, values, indices, W
        w_elt = t[3][1]
        return nb(0) + nb(1) + nb(2) + nb(3), B * k * d * w_elt, 2 * B * k * d
    if name == "_gather_dot_kernel":  # out, g, indices, W
        w_elt = t[3][1]
        return nb(0) + nb(1) + nb(2) + nb(3), B * k * d * w_elt, 2 * B * k * d
    if name == "_scatter_rows_kernel":  # dW, dsum, values, crow, order, token, Y
        y_elt = t[6][1]
        return sum(nb(i) for i in range(7)), B * k * d * y_elt, 2 * B * k * d
    if name == "_adam_kernel":  # p, g, m, v, copy|p, sumsq, scale, flags|sumsq, row step|sumsq, row bc2|sumsq
        c = op["constexprs"]
        rw = 2 * nb(0) + nb(1) + 2 * nb(2) + 2 * nb(3) + (nb(4) if c.get("HAS_COPY") else 0)
        return (rw + (nb(5) if c.get("HAS_SUMSQ") else 0) + (nb(7) if c.get("FLAGS") else 0)
                + (nb(8) + nb(9) if c.get("ROW_BC") else 0)), 0, 0
    return sum(nb(i) for i in range(len(t))), 0, 0


class _Size:
    def __init__(self, small, target):
        self.table = _monomials(small)
        self.target = target
        self.unknown = set()

    def __call__(self, numel: int) -> int:
        m = self.table.get(numel)
        if m is None:
            self.unknown.add(numel)
            return numel
        return m[1](self.target)

    def symbol(self, numel: int) -> str:
        m = self.table.get(numel)
        return m[0] if m else str(numel)


def count(target: Dict[str, int], small: Dict[str, int] = SMALL,
          moments_dtype: Optional[torch.dtype] = None, recipe: bool = False) -> Dict[str, Any]:
    """The table of one step at ``target`` (``B, d, n, k`` and, for the recipe, ``m`` candidates and
    ``ka`` = k_aux), traced at ``small``."""
    small = dict(small, m=small.get("m", 0) if recipe else 0, ka=small["d"] // 2)
    target = dict(target, m=target.get("m", 0) if recipe else 0, ka=target["d"] // 2)
    ops, info = trace_step(small, moments_dtype, recipe)
    if recipe and info["candidates"] != small["m"]:
        raise AssertionError(f"the traced step ran AuxK over {info['candidates']} candidates, not {small['m']}")
    size = _Size(small, target)
    rows: "OrderedDict[Tuple[str, str, str], Dict[str, float]]" = OrderedDict()
    for op in ops:
        if op["kind"] == "kernel":
            b, g, f = _kernel_cost(op, size)
            shapes = ",".join(size.symbol(ne) for ne, _, _ in op["tensors"][:1])
        else:
            b = sum(size(ne) * es for ne, es, _ in op["reads"] + op["writes"])
            g = 0.0
            f = 0.0
            if op["op"] in _MATMUL:
                shp = [s for _, _, s in op["reads"] if len(s) == 2]
                if len(shp) >= 2:
                    (m, kk), (_, nn) = shp[-2], shp[-1]
                    small_flops = 2 * m * kk * nn
                    # rescale: the three dims are each one of B, d, n, k
                    dims = {small[key]: target[key] for key in ("B", "d", "n", "k", "m", "ka") if small[key]}
                    f = 2 * dims.get(m, m) * dims.get(kk, kk) * dims.get(nn, nn)
                    del small_flops
            shapes = ",".join(size.symbol(ne) for ne, _, _ in (op["writes"] or op["reads"])[:1])
        key = (op["phase"], op["where"], op["op"])
        r = rows.setdefault(key, dict(calls=0, bytes=0.0, gathered=0.0, flops=0.0, out=shapes))
        r["calls"] += 1
        r["bytes"] += b
        r["gathered"] += g
        r["flops"] += f
    out = [dict(phase=p, where=w, op=o, **v) for (p, w, o), v in rows.items()]
    out.sort(key=lambda r: (r["phase"], -r["bytes"]))
    totals: Dict[str, Dict[str, float]] = {}
    for r in out:
        tt = totals.setdefault(r["phase"], dict(bytes=0.0, gathered=0.0, flops=0.0, calls=0))
        for key in ("bytes", "gathered", "flops", "calls"):
            tt[key] += r[key]
    sizes = sorted({ne for op in ops for ne, _, _ in op.get("reads", []) + op.get("writes", []) + op.get("tensors", [])})
    return dict(target=target, small=small, step_config=info, rows=out, totals=totals, sizes=sizes,
                total_bytes=sum(r["bytes"] for r in out), total_flops=sum(r["flops"] for r in out),
                unknown_sizes=sorted(size.unknown))


def self_check(res: Dict[str, Any], moments_bytes: int) -> None:
    """The count against closed forms: the encoder GEMM is 2 B d n FLOPs and moves x, W and the
    pre-activations once; fused Adam moves 4 + 4 + 4 (p read/written, g) + 2 x 2 moments + 2 (bf16
    copy) bytes per parameter, plus row sums of squares."""
    t = res["target"]
    B, d, n = t["B"], t["d"], t["n"]
    gemm = [r for r in res["rows"] if r["where"].endswith("_encode_select_two_pass") and r["op"] == "addmm"]
    assert len(gemm) == 1 and gemm[0]["flops"] == 2 * B * d * n, gemm
    assert gemm[0]["bytes"] == 2 * (B * d + n * d + B * n + n), gemm
    adam = [r for r in res["rows"] if r["op"] == "_adam_kernel"]
    params = 2 * n * d + n + d
    want = params * (12 + 4 * moments_bytes + 2)  # + row sums of squares (fp32 per row: ~2 n x 4 B)
    assert len(adam) == 1 and adam[0]["calls"] == 4 and 0 <= adam[0]["bytes"] - want <= 3 * n * 4, (adam, want)


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def row_select_count(d_sae: int, k: int, rows: int) -> Dict[str, Any]:
    """The row select's SASS instructions per element at one shape (``benchmarks/sm90_report.py --sass``,
    compiled for sm_90a: needs Triton's bundled ptxas and cuobjdump, and the interpreter off, so it runs
    in a process of its own). ``{"skipped": reason}`` when it cannot run here."""
    import subprocess
    import tempfile

    env = {kk: v for kk, v in os.environ.items() if kk not in ("TRITON_INTERPRET", "SAE_KERNELS_BACKEND")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sass.json"
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sm90_report.py"), "--sass", "--d-sae", str(d_sae),
                            "--k", str(k), "--rows", str(rows), "--json", str(out)], cwd=str(REPO), env=env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not out.is_file():
            return {"skipped": (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]}
        data = json.loads(out.read_text())
    rows_ = data if isinstance(data, list) else [data]
    if rows_ and "skipped" in rows_[0]:
        return rows_[0]
    return rows_[0] if rows_ else {"skipped": "no result"}


def _phase_floors(res: Dict[str, Any], floor) -> None:
    for tt in res["totals"].values():
        tt["floor_ms"] = floor(tt["bytes"], tt["flops"])
    res["floor_ms"] = floor(res["total_bytes"], res["total_flops"])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096, help="d_model (default 4096)")
    ap.add_argument("--n", type=int, default=32768, help="d_sae (default 32768)")
    ap.add_argument("--k", type=int, default=50, help="k (default 50)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    ap.add_argument("--dead", type=float, default=0.1,
                    help="fraction of the latents among AuxK's candidates (dead, or about to be) in the default "
                         "recipe's step (default 0.1; 0: early training, AuxK does nothing)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s for the floor (H100 SXM: 3.35e12)")
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s for the floor (H100 SXM: 989e12)")
    ap.add_argument("--bf16-moments", action="store_true", help="SAEAdam with bf16 moments (default fp32)")
    ap.add_argument("--json", type=Path, default=None, help="also write both tables and the ratio as JSON here")
    a = ap.parse_args(argv)
    if not 0.0 <= a.dead <= 1.0:
        ap.error(f"--dead: expected a fraction in [0, 1], got {a.dead}")
    from sae_kernels import triton_ops

    target = dict(B=a.tokens, d=a.d, n=a.n, k=a.k, m=round(a.dead * a.n), ka=a.d // 2)
    small = dict(SMALL)
    if a.k >= triton_ops.dense_k_threshold(a.n):  # keep the dense decision of the target shape
        small["k"] = triton_ops.dense_k_threshold(small["n"])
    mdt = torch.bfloat16 if a.bf16_moments else None
    res = count(target, small, mdt)
    # m at the small shape: the dead fraction of n, moved until its products are sizes no other tensor has
    m = max(1, round(a.dead * small["n"])) if a.dead > 0 else 0
    taken = set(res["sizes"]) | set(_monomials(dict(small, m=0, ka=small["d"] // 2)))
    while m and {m, small["B"] * m, m * small["d"]} & taken:
        m += 1
    small["m"] = m
    rec = count(target, small, mdt, recipe=True)
    floor = lambda b, f: (b / a.bandwidth + f / a.peak) * 1e3  # noqa: E731  ms, bytes and FLOPs not overlapped
    _phase_floors(res, floor)
    _phase_floors(rec, floor)
    print(f"one SAEStep at B={a.tokens} d={a.d} n={a.n} k={a.k}, bf16 compute, fp32 masters, SAEAdam "
          f"({'bf16' if a.bf16_moments else 'fp32'} moments) "
          f"(counted from a traced step at B={small['B']} d={small['d']} n={small['n']} k={small['k']}; not timed)")
    print(f"{'phase':<40}{'where':<36}{'op':<26}{'calls':>6}{'bytes':>12}{'gathered':>12}{'GFLOP':>10}")
    for r in res["rows"]:
        print(f"{r['phase']:<40}{r['where']:<36}{r['op']:<26}{r['calls']:>6}{_fmt_bytes(r['bytes']):>12}"
              f"{_fmt_bytes(r['gathered']) if r['gathered'] else '':>12}{r['flops'] / 1e9 if r['flops'] else 0:>10.1f}")
    sc = rec["step_config"]
    print(f"\nthe default recipe adds (AuxK k_aux={target['ka']} over {target['m']} candidate latents = "
          f"{a.dead:.0%} of d_sae, refreshed every {sc['aux_refresh_steps']} steps; row flags "
          f"hold_dead={sc['hold_dead']} reset_dead_moments={sc['reset_dead_moments']}):")
    for r in rec["rows"]:
        if r["phase"][1] == "a":
            print(f"{r['phase']:<40}{r['where']:<36}{r['op']:<26}{r['calls']:>6}{_fmt_bytes(r['bytes']):>12}"
                  f"{_fmt_bytes(r['gathered']) if r['gathered'] else '':>12}"
                  f"{r['flops'] / 1e9 if r['flops'] else 0:>10.1f}")
    print(f"\nper phase (floor = bytes / {a.bandwidth:.3g} B/s + FLOPs / {a.peak:.3g} FLOP/s, gathers in L2):")
    print(f"{'':<40}{'bare step':>34}{'default recipe':>34}")
    for p in sorted(set(res["totals"]) | set(rec["totals"])):
        cells = []
        for r in (res, rec):
            tt = r["totals"].get(p)
            cells.append(f"{_fmt_bytes(tt['bytes']):>12} {tt['flops'] / 1e9:8.1f} GF {tt['floor_ms']:6.2f} ms"
                         if tt else f"{'-':>34}")
        print(f"{p:<40}{cells[0]:>34}{cells[1]:>34}")
    for name, r in (("bare step", res), ("default recipe", rec)):
        print(f"{'total, ' + name:<40} {_fmt_bytes(r['total_bytes']):>12}  {r['total_flops'] / 1e12:.3f} TFLOP  "
              f"floor {r['floor_ms']:6.2f} ms = {a.tokens / r['floor_ms'] * 1e3 / 1e6:.2f}M tokens/s")
    ratio = rec["floor_ms"] / res["floor_ms"]
    print(f"default recipe / bare step: {ratio:.2f}x")
    # the row select is bound by instructions, not bytes: its SASS count (sm_90a) next to its read floor
    sel = {"main": row_select_count(a.n, a.k, a.tokens)}
    if target["m"] > target["ka"]:
        sel["auxk"] = row_select_count(target["m"], target["ka"], a.tokens)
    excess = {name: max(0.0, r["implied_ms"] - r["floor_ms"]) for name, r in sel.items() if "skipped" not in r}
    for name, r in sel.items():
        what = (f"row select (main, d_sae {a.n}, k {a.k})" if name == "main"
                else f"row select (AuxK, {target['m']} candidates, k_aux {target['ka']})")
        if "skipped" in r:
            print(f"{what}: SASS count skipped ({r['skipped']})")
        else:
            print(f"{what}: {r['total_thread_instr_per_elem']:.1f} SASS instructions per element (sm_90a) -> "
                  f"{r['implied_ms']:.3f} ms at one instruction per scheduler per cycle, {r['ratio_to_floor']:.2f}x "
                  f"its read floor ({r['floor_ms']:.3f} ms)")
    if excess:
        # the selects' time by instruction count beyond their read (which the byte floor already holds)
        bare_ms = res["floor_ms"] + excess.get("main", 0.0)
        rec_ms = rec["floor_ms"] + sum(excess.values())
        ratio_sass = rec_ms / bare_ms
        print(f"with the row selects at their SASS counts: bare step {bare_ms:.2f} ms, default recipe {rec_ms:.2f} ms, "
              f"default recipe / bare step: {ratio_sass:.2f}x")
    else:
        ratio_sass = None
    for r in (res, rec):
        if r["unknown_sizes"]:
            print(f"tensors of unscaled sizes (counted as at the small shape): {r['unknown_sizes']}")
    self_check(res, 2 if a.bf16_moments else 4)
    if a.json:
        a.json.write_text(json.dumps({"bare": res, "recipe": rec, "recipe_over_bare": ratio, "row_select_sass": sel,
                                      "recipe_over_bare_with_sass": ratio_sass},
                                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
