"""Decoding options: the one definition of every decoding knob, its bounds, its meaning and its default.

`DecodingOptions` is a plain dataclass whose fields are `Annotated` types: the type, the bounds every caller must
respect (`annotated_types.Ge/Gt/Le`, checked by `DecodingOptions` itself) and an `About` (the one description,
the tighter limits the HTTP service puts on work per request, the CLI flag). Everything else is derived from it:
the command-line flags (`add_decoding_arguments`, `decoding_options`), the service's query/form parameters, its
settings and its response (service/schemas.py, service/settings.py, through `decoding_fields`).

`RECOMMENDED` (next to it, once) is what users get when they ask for nothing in particular.
"""

from __future__ import annotations

import argparse
import functools
import math
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le

Method = Literal["greedy", "sample", "beam"]


class About:
    """Field metadata: what an option means, the service's extra limits (annotated_types constraints, on top of
    the field's own bounds) and the CLI flag when it is not `--name-with-dashes`."""

    __slots__ = ("description", "service_limits", "flag")

    def __init__(self, description: str, *service_limits: Any, flag: str | None = None):
        self.description, self.service_limits, self.flag = description, service_limits, flag

    def __repr__(self) -> str:
        return f"About({self.description!r})"


@dataclass
class DecodingOptions:
    method: Annotated[Method, About("decoding method")] = "greedy"
    max_length: Annotated[int, Ge(1), About("most words in a caption (END not counted)", Le(50))] = 20
    beam_size: Annotated[int, Ge(1), About("beams kept by beam search (K)", Le(10))] = 3
    length_penalty: Annotated[
        float, About("beam score = log p / length**length_penalty (0: plain log p)", Ge(0), Le(5))
    ] = 0.0
    no_repeat_ngram_size: Annotated[
        int, About("no word n-gram of this size is said twice, whatever the method (0: repeats allowed)", Ge(0),
                   Le(10), flag="--no-repeat-ngram")
    ] = 0
    temperature: Annotated[float, Ge(0), About("sampling temperature (0: greedy)", Le(5))] = 1.0
    top_k: Annotated[int, Ge(0), About("sample from the k likeliest words only (0: no top-k filter)", Le(1000))] = 0
    top_p: Annotated[float, Gt(0), Le(1), About("nucleus sampling mass (1: no nucleus filter)")] = 1.0
    num_captions: Annotated[
        int, Ge(1), About("captions returned per image (samples, or the n-best beams up to beam_size)", Le(10))
    ] = 1
    seed: Annotated[int | None, About("sampling seed, for reproducible samples", Ge(0), Le(2**63 - 1))] = None
    uncertain_below: Annotated[
        float | None, Le(0), About("flag the caption as uncertain when its mean log p per word (<end> included) is "
                                   "below this (unset: never)")
    ] = None

    def __post_init__(self) -> None:
        for spec in decoding_fields():
            spec.check(getattr(self, spec.name))
        if self.method == "beam" and self.num_captions > self.beam_size:
            raise ValueError("beam search returns at most beam_size captions: raise beam_size or lower num_captions")
        if self.num_captions > 1 and self.one_caption:
            raise ValueError(f"{self._one_caption_method} gives one caption: for num_captions > 1 use method beam "
                             "(the n best) or sample at a temperature above 0")

    @property
    def one_caption(self) -> bool:
        """Whether the method can only give one caption (greedy, and sampling at temperature 0, which is greedy)."""
        return self.method == "greedy" or (self.method == "sample" and self.temperature == 0)

    @property
    def _one_caption_method(self) -> str:
        return "greedy decoding" if self.method == "greedy" else "sampling at temperature 0 (greedy)"

    def updated(self, **given) -> DecodingOptions:
        """These options with the `given` fields replaced. Asking beam search for more captions than the beam
        holds widens the beam, unless beam_size is among `given`: then the mismatch is the caller's error."""
        merged = {**{f.name: getattr(self, f.name) for f in fields(self)}, **given}
        if merged["method"] == "beam" and "beam_size" not in given:
            merged["beam_size"] = max(merged["beam_size"], merged["num_captions"])
        one_caption = merged["method"] == "greedy" or (merged["method"] == "sample" and merged["temperature"] == 0)
        if one_caption and "num_captions" not in given:  # a default of several captions, for a method that has one
            merged["num_captions"] = 1
        return DecodingOptions(**merged)


# What users get when they ask for nothing in particular (CLI, service, `Captioner.caption`), chosen on coco-3k
# val for the shipped kind of model, cross-entropy + SCST (docs/training-log.md): beam search of width 2, length
# normalisation by the caption's length, and no repeated word pair (small models otherwise say "large large
# large"). DecodingOptions() itself stays plain greedy decoding, the reference the invariants are stated against.
RECOMMENDED = {"method": "beam", "beam_size": 2, "length_penalty": 1.0, "no_repeat_ngram_size": 2}


def describe_recommended() -> str:
    """RECOMMENDED in words, e.g. "beam 2, length penalty 1, no repeated bigram" (for help texts)."""
    r = DecodingOptions(**RECOMMENDED)
    parts = [f"beam {r.beam_size}, length penalty {r.length_penalty:g}" if r.method == "beam" else r.method]
    if r.no_repeat_ngram_size:
        ngram = {1: "word", 2: "bigram", 3: "trigram"}.get(r.no_repeat_ngram_size, f"{r.no_repeat_ngram_size}-gram")
        parts.append(f"no repeated {ngram}")
    return ", ".join(parts)


def recommended_options(**given) -> DecodingOptions:
    """RECOMMENDED with the `given` fields on top (a larger num_captions widens the recommended beam)."""
    return DecodingOptions(**RECOMMENDED).updated(**given)


# --------------------------------------------------------------------------------------------------------------
# Reading the definition.


@dataclass(frozen=True)
class DecodingField:
    """One field of DecodingOptions, read from its annotation."""

    name: str
    type: Any  # the plain type: int, float, Method, int | None
    bounds: tuple[Any, ...]  # annotated_types constraints every caller must respect
    about: About
    default: Any  # DecodingOptions' own default (RECOMMENDED aside)

    @property
    def service_bounds(self) -> tuple[Any, ...]:
        """The field's bounds and the HTTP service's tighter limits on work per request."""
        return (*self.bounds, *self.about.service_limits)

    @property
    def optional(self) -> bool:
        """Whether None is a value (`int | None`): the option can be left unset."""
        return type(None) in typing.get_args(self.type)

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else None

    @property
    def recommended(self) -> Any:
        return RECOMMENDED.get(self.name, self.default)

    def check(self, value: Any) -> None:
        """Raise ValueError when `value` is not allowed (the service's limits aside)."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be {', '.join(self.choices[:-1])} or {self.choices[-1]}, "
                             f"not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, not {value}")
        if value is None or not self.bounds:
            return
        low = next((b for b in self.bounds if isinstance(b, Ge | Gt)), None)
        high = next((b for b in self.bounds if isinstance(b, Le)), None)
        too_low = low is not None and (value < low.ge if isinstance(low, Ge) else value <= low.gt)
        if too_low or (high is not None and value > high.le):
            raise ValueError(f"{self.name} must be {_interval(low, high)}")


def _interval(low: Ge | Gt | None, high: Le | None) -> str:
    if high is None:
        return f">= {low.ge}" if isinstance(low, Ge) else f"> {low.gt}"
    if low is None:
        return f"<= {high.le}"
    opening = f"[{low.ge}" if isinstance(low, Ge) else f"({low.gt}"
    return f"in {opening}, {high.le}]"


@functools.cache
def decoding_fields() -> tuple[DecodingField, ...]:
    """Every field of DecodingOptions, in order, with its type, bounds, description and default."""
    hints = typing.get_type_hints(DecodingOptions, include_extras=True)
    out = []
    for f in fields(DecodingOptions):
        base, *metadata = typing.get_args(hints[f.name])
        about = next(m for m in metadata if isinstance(m, About))
        bounds = tuple(m for m in metadata if not isinstance(m, About))
        default = None if f.default is MISSING else f.default
        out.append(DecodingField(f.name, base, bounds, about, default))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# The command line.


def add_decoding_arguments(p: argparse.ArgumentParser, num_captions: bool = True) -> None:
    """Decoding flags shared by caption, evaluate and visualize: one per field, RECOMMENDED as defaults."""
    g = p.add_argument_group(f"decoding (defaults chosen on val: {describe_recommended()})")
    for spec in decoding_fields():
        if spec.name == "num_captions" and not num_captions:
            continue
        flag = spec.about.flag or "--" + spec.name.replace("_", "-")
        help_text = spec.about.description
        default = spec.recommended
        if spec.name == "beam_size":  # None: the recommended beam, widened to --num-captions (`updated`)
            help_text += f"; default {default}, raised to --num-captions when that is larger"
            default = None
        elif default is not None:
            help_text += " (default %(default)s)"
        kind = next(t for t in typing.get_args(spec.type) if t is not type(None)) if spec.optional else spec.type
        g.add_argument(flag, dest=spec.name, default=default, help=help_text,
                       **({"choices": spec.choices} if spec.choices else {"type": kind}))


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """The decoding flags as options; an impossible combination exits with the reason (no traceback)."""
    given = {spec.name: getattr(args, spec.name) for spec in decoding_fields() if hasattr(args, spec.name)}
    if given.get("beam_size") is None:
        given.pop("beam_size", None)  # the recommended beam, widened to num_captions; an explicit one is kept
    try:
        return recommended_options(**given)
    except ValueError as exc:
        from .usage import UsageError

        raise UsageError(str(exc)) from None
