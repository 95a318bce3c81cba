"""ServerContext: what the HTTP handlers share — the server args, the engine process, the
TokenizerManager, the metrics and the file/batch store. One per app; handlers reach it through
``ctx_of(request)``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from starlette.requests import Request

from kvyard.errors import RequestError
from kvyard.server_args import ServerArgs


@dataclass
class ServerContext:
    args: ServerArgs
    engine: Any                       # kvyard.frontend.launch.EngineProcess
    tm: Any                           # kvyard.frontend.tokenizer_manager.TokenizerManager
    metrics: Optional[Any] = None     # kvyard.server.metrics.ServerMetrics
    files: Optional[Any] = None       # kvyard.server.files_batches.FileStore
    batches: Optional[Any] = None     # kvyard.server.files_batches.BatchRunner
    responses: Optional[Any] = None   # kvyard.server.responses_store.ResponseStore (made on first use)
    ready: bool = False               # warmup passed; /health answers 200
    started: int = field(default_factory=lambda: int(time.time()))
    failed: Optional[str] = None      # why start-up (warmup) failed, if it did
    request_shutdown: Callable[[], None] = field(default=lambda: None)
    listening: Callable[[], bool] = field(default=lambda: True)   # the HTTP socket is bound

    @property
    def model_name(self) -> str:
        """--served-model-name, else the model path the server started with (a later
        /update_weights_from_disk does not rename the model)."""
        return self.args.served_model_name or self.engine.args.model_path

    @property
    def is_generation(self) -> bool:
        return not self.tm.info.get("is_embedding", False)

    def require_tokenizer(self, what: str) -> None:
        if self.tm.tokenizer is None:
            raise RequestError(f"{what}: text needs a tokenizer; the server runs with --skip-tokenizer-init "
                               "(send token ids)", param=what)


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx
