"""LoRA adapters over HTTP (kvyard.lora): SGLang's /load_lora_adapter and /unload_lora_adapter,
and the OpenAI ``model`` field naming an adapter ("BASE:name" or "name").

Both routes are admin paths (admin.ADMIN_PATHS: --admin-api-key when set). An unload waits for
the requests already using the adapter; new requests for it are refused from the first moment.
"""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.response_models import LoRAAdapters

router = APIRouter()


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str
    pinned: bool = False          # SGLang's; every loaded adapter stays on the host until unloaded


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str


def _result(adapters: dict, message: str) -> dict:
    return {"success": True, "message": message,
            "loaded_adapters": {name: a["path"] for name, a in adapters.items()}}


@router.post("/load_lora_adapter", response_model=LoRAAdapters)
async def load_lora_adapter(body: LoadLoRARequest, request: Request):
    adapters = await ctx_of(request).tm.load_lora_adapter(body.lora_name, body.lora_path)
    return _result(adapters, f"adapter {body.lora_name!r} loaded")


@router.post("/unload_lora_adapter", response_model=LoRAAdapters)
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request):
    adapters = await ctx_of(request).tm.unload_lora_adapter(body.lora_name)
    return _result(adapters, f"adapter {body.lora_name!r} unloaded")


def adapter_of_model(ctx: ServerContext, model: Optional[str]) -> Optional[str]:
    """The adapter an OpenAI ``model`` field selects: "BASE:name" or "name" (None: the base model;
    names that are neither the served model's nor an adapter's keep meaning the base model)."""
    adapters = ctx.tm.lora_adapters
    if model is None or adapters is None or model == ctx.model_name:
        return None
    prefix = f"{ctx.model_name}:"
    if model.startswith(prefix):
        name = model[len(prefix):]
        ctx.tm.check_lora(name, "model")
        return name
    if model in adapters:
        ctx.tm.check_lora(model, "model")
        return model
    return None


def adapter_cards(ctx: ServerContext, created: int) -> list[dict]:
    """/v1/models entries of the loaded adapters (SGLang's shape: parent = the base model)."""
    return [{"id": name, "object": "model", "created": created, "owned_by": "kvyard", "root": a["path"],
             "parent": ctx.model_name, "max_model_len": ctx.tm.context_length}
            for name, a in (ctx.tm.lora_adapters or {}).items()]
