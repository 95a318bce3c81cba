"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings. The work is in openai_chat and openai_completions; files and batches are in
files_batches."""
from __future__ import annotations

from fastapi import APIRouter, Request

from kvyard.errors import RequestError
from kvyard.server.context import ctx_of
from kvyard.server.lora_api import adapter_cards
from kvyard.server.openai_chat import chat_completion
from kvyard.server.openai_completions import completion, embeddings
from kvyard.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvyard.server.response_models import ChatCompletion, Completion, EmbeddingList, ModelCard, ModelList, ok

router = APIRouter()


def _model_card(ctx) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "kvyard",
            "root": ctx.args.model_path, "max_model_len": ctx.tm.context_length}


@router.get("/v1/models", responses=ok(ModelList))
async def list_models(request: Request):
    ctx = ctx_of(request)
    return {"object": "list", "data": [_model_card(ctx)] + adapter_cards(ctx, ctx.started)}


@router.get("/v1/models/{model_id:path}", responses=ok(ModelCard))
async def retrieve_model(model_id: str, request: Request):
    ctx = ctx_of(request)
    for card in adapter_cards(ctx, ctx.started):
        if card["id"] == model_id:
            return card
    if model_id != ctx.model_name:
        raise RequestError(f"model: {model_id!r} is not served here (serving {ctx.model_name!r})",
                           param="model", status=404)
    return _model_card(ctx)


@router.post("/v1/chat/completions", responses=ok(ChatCompletion))
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await chat_completion(ctx_of(request), req, request)


@router.post("/v1/completions", responses=ok(Completion))
async def completions(req: CompletionRequest, request: Request):
    return await completion(ctx_of(request), req, request)


@router.post("/v1/embeddings", responses=ok(EmbeddingList))
async def create_embeddings(req: EmbeddingRequest, request: Request):
    return await embeddings(ctx_of(request), req, request)
