"""Guided decoding (structured output) on the driver: a request's constraint (spec), compiled per tokenizer
(compiler), followed token by token by a per-request matcher that gives the allowed-token bitmask sent with each
step (bitmask); the sampler applies it. Grammar work is llguidance's (imported only when a request asks)."""

from remp.guided.bitmask import bitmask_words, pack_allowed, unpack_allowed
from remp.guided.compiler import CompiledGuide, GuidedCompiler
from remp.guided.matcher import GuidedMatcher, fill_masks
from remp.guided.spec import GuidedSpec, guided_spec_from_request

__all__ = [
    "CompiledGuide",
    "GuidedCompiler",
    "GuidedMatcher",
    "GuidedSpec",
    "bitmask_words",
    "fill_masks",
    "guided_spec_from_request",
    "pack_allowed",
    "unpack_allowed",
]
