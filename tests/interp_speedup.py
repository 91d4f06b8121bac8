"""Make Triton 3.9's interpreter cheaper for nested @jit calls (test harness only; no semantic change).

Under ``TRITON_INTERPRET=1`` every call of a nested ``@triton.jit`` function (``tl.sum``, ``tl.max``,
``tl.cumsum`` are such functions) runs ``_patch_lang`` again: it rescans ``triton.language`` with
``inspect.getmembers`` and re-installs the interpreter's versions of every builtin, 3-9 ms per call
on these cores, most of the kernels' test time. Inside a launch those modules are already patched
(the launch restores them when it ends), so:

* a nested call whose modules are already patched by the running launch skips the re-patching;
* a nested call that sees a module the launch did not patch (``triton.language.core`` from the
  standard library) patches it as before;
* the scan of a module's builtins is done once and cached (modules do not change).

Measured identical outputs (bitwise) of every launcher with and without it; ~2-3x faster kernel
tests. ``SAE_KERNELS_SLOW_INTERPRETER=1`` turns it off. It touches nothing when the interpreter's
internals differ from Triton 3.9's (then the tests are just slower).
"""
import inspect
import os
import threading


def install() -> bool:
    if os.environ.get("SAE_KERNELS_SLOW_INTERPRETER") == "1" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as I
    except Exception:
        return False
    if getattr(I, "_sae_kernels_speedup", False):
        return True
    needed = ("_patch_lang", "_patch_builtin", "_patch_attr", "_LangPatchScope")
    if not all(hasattr(I, n) for n in needed):
        return False
    orig_patch_lang = I._patch_lang
    cache = {}
    state = threading.local()

    def patch_builtin(pkg, builder, scope):
        members = cache.get(id(pkg))
        if members is None:
            members = cache[id(pkg)] = [(n, m) for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
        for name, member in members:
            I._patch_attr(pkg, name, member, builder, scope)

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}
        active = getattr(state, "langs", None)
        if active is not None and langs <= active:
            return I._LangPatchScope()  # already patched by the running launch, which restores it
        scope = orig_patch_lang(fn)
        if active is not None:  # nested, new module: patched as before (never restored, as before)
            active |= langs
            return scope
        state.langs = set(langs)
        restore = scope.restore

        def restore_and_clear():
            state.langs = None
            restore()

        scope.restore = restore_and_clear
        return scope

    I._patch_builtin = patch_builtin
    I._patch_lang = patch_lang
    I._sae_kernels_speedup = True
    return True
