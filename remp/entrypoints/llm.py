"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from remp.engine import LLMEngine
from remp.engine_args import EngineArgs
from remp.outputs import RequestOutput
from remp.planner.mode import LIVE, SwitchMode
from remp.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.llm_engine = LLMEngine(EngineArgs.from_kwargs(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a prompt without SamplingParams samples with: the model's generation_config.json defaults (as
        vLLM's LLM applies them), else SamplingParams()."""
        d = self.llm_engine.model_config.generation_defaults
        fields = {k: d[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in d}
        return SamplingParams(**fields, **({"max_tokens": d["max_new_tokens"]} if "max_new_tokens" in d else {}))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A prompt is text, a list of token ids, or a dict with
        'prompt' or 'prompt_token_ids'. Every prompt is validated before any is queued."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(None, prompt, p or self.get_default_sampling_params()))
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        tok = self.llm_engine.tokenizer
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )
        return tok.encode(text, add_special_tokens=False)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, pending, done = self.llm_engine, set(ids), {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        while pending:
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

    def reconfigure(
        self,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        layer_split: list[int] | None = None,
        mode: str | SwitchMode = LIVE,
        data_parallel_size: int = 1,
    ):
        """Switch the running engine's topology; see LLMEngine.reconfigure. Returns a SwitchReport."""
        return self.llm_engine.reconfigure(
            tensor_parallel_size, pipeline_parallel_size, layer_split, mode, data_parallel_size
        )

    def shutdown(self) -> None:
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
