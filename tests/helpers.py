"""Comparison helpers shared by the tests (import as ``from helpers import ...``)."""
import os

import pytest
import torch

from sae_kernels.backend import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def triton_test_device() -> str:
    """Where a Triton kernel test module runs: ``"cpu"`` in the interpreter (TRITON_INTERPRET=1), else
    ``"cuda"`` compiled; the module is skipped when it can do neither."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


# (dtype, tol) for ``assert_close(got, want, tol)``: relative to the scale of the whole tensor, so that
# cancellation in one entry cannot hide a bug elsewhere and bf16 rounding passes.
DTYPE_TOLS = [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]


def mismatches(got: torch.Tensor, want: torch.Tensor, tol: float = 0.0, *, atol: float = 0.0,
               rtol: float = 0.0) -> str:
    """Empty string when close; otherwise the mismatch count and the worst entry. An entry mismatches when
    ``|got - want| > tol * (|want| + max|want|) + rtol * |want| + atol``: ``tol`` relative to the tensor's
    scale (the default form), ``rtol`` / ``atol`` per entry (for values that pass through a dtype)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs()
    bound = tol * (want.abs() + scale) + rtol * want.abs() + atol + (1e-12 if tol else 0.0)
    bad = err > bound
    if not bad.any():
        return ""
    i = int(err.argmax())
    first = tuple(bad.nonzero()[0].tolist())
    return (
        f"{int(bad.sum())}/{bad.numel()} mismatches (tol {tol:g}, rtol {rtol:g}, atol {atol:g}); first at {first}; "
        f"worst at flat {i}: got {got.reshape(-1)[i].item():.6g}, want {want.reshape(-1)[i].item():.6g} "
        f"(max abs err {err.max().item():.3e})"
    )


def assert_close(got, want, tol: float = 0.0, what: str = "", *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """The tests' one tolerance check (see ``mismatches``): every output and gradient against its float64
    reference, the report naming how many entries are off."""
    msg = mismatches(got, want, tol, atol=atol, rtol=rtol)
    assert not msg, f"{what}: {msg}"


BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
            reason="triton not importable, or no GPU and not interpreting",
        ),
    ),
]


def assert_refused_before_load(model: str, output, argv, flag: str, item: str, capsys, monkeypatch) -> None:
    """``python -m trainer.run`` with ``argv`` exits 2 with one ``error:`` line naming ``flag`` and ``item``,
    before the model loads."""
    import trainer.run as R

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(R, "load_model", no_load)
    assert R.main(["--model", model, "--output", str(output), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and item in err, err
