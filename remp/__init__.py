"""remp: an LLM serving engine whose tensor x pipeline parallel topology can change while it serves."""

from remp.engine import LLMEngine
from remp.engine_args import EngineArgs
from remp.entrypoints.llm import LLM
from remp.outputs import CompletionOutput, Logprob, RequestOutput
from remp.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
