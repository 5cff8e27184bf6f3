"""vLLM's /tokenize and /detokenize: a prompt (or a chat, rendered by its template) to token ids, and back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from remp.entrypoints.errors import APIError
from remp.entrypoints.openai_routes import check_model
from remp.entrypoints.protocol import DetokenizeRequest, TokenizeRequest
from remp.entrypoints.state import server_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either `prompt` or `messages`")
    if req.prompt is not None:
        ids = await state.prompts.prompt_ids(req.prompt, None, add_special_tokens=req.add_special_tokens is not False)
    else:
        ids = await state.prompts.chat_ids(
            [m.to_template() for m in req.messages],
            None,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            chat_template=req.chat_template,
            template_kwargs=req.chat_template_kwargs,
            add_special_tokens=bool(req.add_special_tokens),
        )
    out = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = state.core.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    check_model(state, req.model)
    vocab = state.core.model_config.vocab_size
    if bad := [t for t in req.tokens if not 0 <= t < vocab]:
        raise APIError(400, f"token ids outside the vocabulary (size {vocab}): {bad[:5]}", param="tokens")
    return {"prompt": state.core.tokenizer.decode(req.tokens)}
