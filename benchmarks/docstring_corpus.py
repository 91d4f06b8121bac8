"""Write a larger offline English corpus: the embedded default's text, then the standard library's docstrings.

    python benchmarks/docstring_corpus.py OUT.jsonl
    python -m trainer.run --layer 12 --position A --dataset OUT.jsonl

The JSONL holds ``pydoc_data.topics`` (sorted keys, exactly the documents of the embedded default), then,
one document per module, the docstrings longer than 200 characters of the running Python's standard
library (folders whose path contains test, idlelib, lib2to3 or site-packages left out, so unittest too): about 370k training tokens with SmolLM2's tokenizer
against 103k. The first documents being those of the default, the held-out contexts (the first of
every 10th context) are bitwise the default's: it measures one pass over more text against the
default's replays of its small corpus (docs/method.md sec. 13).
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig

SKIP = ("site-packages", "test", "idlelib", "lib2to3", "__pycache__")


def module_docstrings(path: str, min_chars: int = 200) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > min_chars:
                parts.append(doc)
    return "\n\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].endswith(".jsonl"):
        print("usage: python benchmarks/docstring_corpus.py OUT.jsonl", file=sys.stderr)
        return 2
    from trainer.data import pydoc_documents

    docs = list(pydoc_documents())  # the embedded default's documents, in its order
    n_default = len(docs)
    lib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(lib):
        dirs.sort()
        if any(s in root for s in SKIP):
            continue
        for f in sorted(files):
            if f.endswith(".py"):
                text = module_docstrings(os.path.join(root, f))
                if text:
                    docs.append(text)
    tmp = argv[0] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    os.replace(tmp, argv[0])
    print(f"{argv[0]}: {len(docs)} documents ({n_default} from pydoc_data.topics), "
          f"{sum(len(d) for d in docs):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
