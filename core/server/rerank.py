"""POST /v1/rerank: a query against documents through a cross-encoder, as SGLang serves it.

Each (query, document) pair is tokenized as one pair sequence and scored by the served
classification model (BertForSequenceClassification, XLMRobertaForSequenceClassification, ...).
The answer is a JSON list sorted by score, best first, each item
    {"index": position in ``documents``, "score": s, "relevance_score": s,
     "document": the text (unless return_documents is false), "meta_info": {...}}
with s = sigmoid(logit), what sentence-transformers' CrossEncoder returns for a one-label model
(the raw logits are /classify's). ``top_n`` keeps the best n.
"""
from __future__ import annotations

import math
from typing import Optional

from fastapi import APIRouter, Request

from kvyard.errors import RequestError
from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.openai_completions import encode
from kvyard.server.protocol import RerankRequest
from kvyard.server.response_models import RerankResponse, ok

router = APIRouter()


@router.post("/v1/rerank", responses=ok(RerankResponse))
async def rerank_route(req: RerankRequest, request: Request):
    return await rerank(ctx_of(request), req, request)


async def rerank(ctx: ServerContext, req: RerankRequest, request: Optional[Request] = None) -> list[dict]:
    if ctx.is_generation:
        raise RequestError("model: the served model generates text; /v1/rerank needs a cross-encoder "
                           "(a *ForSequenceClassification model)", param="model")
    if not req.query:
        raise RequestError("query: must be a non-empty string", param="query")
    if not req.documents or not all(req.documents):
        raise RequestError("documents: must be a non-empty list of non-empty strings", param="documents")
    if req.top_n is not None and req.top_n < 1:
        raise RequestError("top_n: must be at least 1", param="top_n")
    outs = await encode(ctx, {"text": [[req.query, doc] for doc in req.documents]}, request)
    results = []
    for index, (doc, out) in enumerate(zip(req.documents, outs)):
        logits = out["embedding"]
        if len(logits) != 1:
            raise RequestError(f"model: /v1/rerank needs a one-label cross-encoder; the served model "
                               f"returns {len(logits)} scores per input (use /classify)", param="model")
        score = 1.0 / (1.0 + math.exp(-logits[0]))
        item = {"index": index, "score": score, "relevance_score": score, "meta_info": out["meta_info"]}
        if req.return_documents:
            item["document"] = doc
        results.append(item)
    results.sort(key=lambda r: r["score"], reverse=True)
    return results[:req.top_n] if req.top_n is not None else results
