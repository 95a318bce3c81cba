"""Entry-point module of the built-in logit processors (select one per request with
``custom_logit_processor`` and give its arguments in ``sampling_params.custom_params``):

- ``ban_tokens``: {"token_ids": [..]} never sampled;
- ``force_token``: {"token_id": t} is always sampled (SGLang's deterministic example).
"""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_logit_processors(register):
    register("ban_tokens", "kvyard_plugins.logit_processors.builtin:BanTokens")
    register("force_token", "kvyard_plugins.logit_processors.builtin:ForceToken")
