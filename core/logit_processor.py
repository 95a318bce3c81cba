"""The logit-processor plugin contract: custom logit processing, selected per request by name.

A plugin registers classes by name (``register_logit_processors``); a request picks one with
``custom_logit_processor: "<name>"`` and passes it arguments in
``sampling_params.custom_params`` (SGLang's field names). Code never travels with a request:
SGLang's pickled processors are refused, and the server's operator decides which processors exist
by installing plugins.

Lifecycle: one instance per name per scheduler process, built on first use with no arguments;
``__call__`` runs on the device's sampling path every step for the rows of the requests that
selected it, before bias, penalties, grammar mask and temperature.

Invariants: ``__call__`` returns a tensor of the same shape (it may modify ``logits`` in place);
it must not sync with the host for speed's sake (not enforced) and must not keep references to
the rows between calls (rows move as requests come and go).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class LogitProcessor(ABC):
    name: str = ""

    @abstractmethod
    def __call__(self, logits: Any, custom_params: list[dict]) -> Any:
        """logits [N, V] float32, one row per request that selected this processor;
        custom_params [N]: each request's ``sampling_params.custom_params`` ({} when absent)."""
