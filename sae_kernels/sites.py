"""Where an SAE reads and writes, named once (docs/method.md sec. 1).

A ``Site`` is a hook point of a Llama decoder layer: a layer and a position, R (residual stream after
the layer), A (attention output), M (MLP output) or TC (transcoder: the normalised MLP input, read, and
the MLP output, predicted). It is the one place that knows the names a site goes by:

* Llama Scope's ``L{layer}{position}`` (``L3R``, ``L12TC``; ``Site.parse``), which starts a member's
  name ``L3R-8x`` (``Site.member`` / ``Site.parse_member``);
* the TransformerLens hook names the checkpoint formats write, ``(hook_in, hook_out)``
  (``blocks.3.hook_resid_post``; ``Site.hooks`` / ``Site.from_hooks``): a transcoder reads one hook and
  predicts another;
* the hooks an LM capture reads for it (``Site.reads``: the input, and the target when it differs), which
  the trainer lays out as the activation buffer's column blocks.

>>> Site.parse("L12TC").hooks
('blocks.12.ln2.hook_normalized', 'blocks.12.hook_mlp_out')
>>> Site.from_hooks("blocks.3.hook_resid_post").name
'L3R'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

POSITIONS = ("R", "A", "M", "TC")

# TransformerLens hook names of the four positions: (input, output).
HOOK_NAMES = {
    "R": ("blocks.{L}.hook_resid_post", "blocks.{L}.hook_resid_post"),
    "A": ("blocks.{L}.hook_attn_out", "blocks.{L}.hook_attn_out"),
    "M": ("blocks.{L}.hook_mlp_out", "blocks.{L}.hook_mlp_out"),
    "TC": ("blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out"),
}
# The hook kinds above, as they follow "blocks.{L}." in a hook name.
HOOK_KINDS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out", "ln2.hook_normalized")

_NAME = re.compile(r"L(\d+)(R|A|M|TC)(?:-(\d+)x(?:-k(\d+))?)?")
_HOOK = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")")


@dataclass(frozen=True)
class Site:
    """A layer and a position (R, A, M, TC); ``Site(12, "R")`` is ``L12R``."""

    layer: int
    position: str

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer: expected an int >= 0, got {self.layer!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position: expected one of {', '.join(POSITIONS)}, got {self.position!r}")

    # ------------------------------------------------------------------ names

    @property
    def name(self) -> str:
        """Llama Scope's name, ``L{layer}{position}``."""
        return f"L{self.layer}{self.position}"

    def member(self, expansion: int, k: Optional[int] = None) -> str:
        """The name of an SAE of ``expansion`` x d_model latents here: ``L{layer}{position}-{expansion}x``,
        and ``-k{K}`` after it for a member of a sweep over K."""
        return f"{self.name}-{expansion}x" + ("" if k is None else f"-k{k}")

    @property
    def hooks(self) -> Tuple[str, str]:
        """TransformerLens names ``(hook_in, hook_out)``: what the SAE reads and what it reconstructs."""
        hook_in, hook_out = HOOK_NAMES[self.position]
        return hook_in.format(L=self.layer), hook_out.format(L=self.layer)

    @property
    def reads(self) -> Tuple[str, ...]:
        """The distinct hooks a capture reads for this site: its input, and its target for a transcoder."""
        hook_in, hook_out = self.hooks
        return (hook_in,) if hook_in == hook_out else (hook_in, hook_out)

    @property
    def transcoder(self) -> bool:
        """Whether the SAE predicts another hook than it reads (TC)."""
        return self.position == "TC"

    def sort_key(self) -> Tuple[int, int]:
        """Layer, then R, A, M, TC: the order of a suite's members."""
        return self.layer, POSITIONS.index(self.position)

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, text: str, what: str = "hook point") -> "Site":
        """``"L3R"`` -> ``Site(3, "R")``; anything else is a ValueError naming ``what``."""
        m = _NAME.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None or m.group(3) is not None:
            raise ValueError(f"{what}: {text!r} is not a hook point name: expected L{{layer}}{{position}} with a "
                             f"position among {', '.join(POSITIONS)}, e.g. L3R or L12TC")
        return cls(int(m.group(1)), m.group(2))

    @classmethod
    def parse_member(cls, name: str) -> Optional[Tuple["Site", int]]:
        """``"L3R-8x"`` (or a sweep's ``"L3R-8x-k50"``) -> ``(Site(3, "R"), 8)``; None for any other name."""
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None or m.group(3) is None:
            return None
        return cls(int(m.group(1)), m.group(2)), int(m.group(3))

    @classmethod
    def from_hooks(cls, hook_in: Optional[str], hook_out: Optional[str] = None) -> Optional["Site"]:
        """The site whose ``hooks`` are ``(hook_in, hook_out or hook_in)``; None if no position matches."""
        layer = hook_layer(hook_in)
        if layer is None:
            return None
        for position in POSITIONS:
            site = cls(layer, position)
            if site.hooks == (hook_in, hook_out or hook_in):
                return site
        if hook_out is None:  # the input alone names the site (a transcoder's input hook is its own)
            for position in POSITIONS:
                if cls(layer, position).hooks[0] == hook_in:
                    return cls(layer, position)
        return None


def hook_layer(hook: Optional[str]) -> Optional[int]:
    """The layer of a ``blocks.{L}.`` hook name (any hook of that block), else None."""
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(m.group(1)) if m else None


def parse_hook(hook: str) -> Tuple[int, str]:
    """``(layer, kind)`` of one of the four hooks (``blocks.3.hook_resid_post`` -> ``(3, "hook_resid_post")``)."""
    m = _HOOK.fullmatch(hook) if isinstance(hook, str) else None
    if m is None:
        raise ValueError(f"hook: expected blocks.L.{'|'.join(HOOK_KINDS)}, got {hook!r}")
    return int(m.group(1)), m.group(2)


def hook_points(layer: int, position: str) -> Tuple[str, str]:
    """TransformerLens names ``(hook_in, hook_out)`` of ``position`` at ``layer`` (``Site(...).hooks``)."""
    return Site(layer, position).hooks
