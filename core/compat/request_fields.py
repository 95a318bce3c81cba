"""SGLang's native request objects (GenerateReqInput for /generate and Engine.generate,
EmbeddingReqInput for /encode and Engine.encode): every field they define is accepted.

- fields kvyard acts on are the TokenizerManager's own (``ACTED_*``);
- ``HARMLESS`` fields are ignored whatever their value (logging, tracing and routing hints for a
  single replica);
- every other SGLang field is ignored when it holds its "off" value (None, False, empty,
  SGLang's default) and refused, naming the field, when it asks for something kvyard lacks.
A field SGLang does not define is an unknown field.
"""
from __future__ import annotations

from kvyard.errors import RequestError

GENERATE_FIELDS = """
    rid session_id text input_ids input_embeds image_data video_data audio_data mm_hashes
    mm_content_hashes use_audio_in_video video_config sampling_params watermark return_logprob
    logprob_start_len top_logprobs_num token_ids_logprob return_sampling_mask sampling_logprobs_mode
    return_text_in_logprobs return_flat_raw_top_logprobs return_flat_raw_output_top_logprobs
    return_flat_raw_top_logprobs_b64 stream log_metrics return_hidden_states return_routed_experts
    routed_experts_start_len return_indexer_topk modalities session_params lora_path lora_id
    custom_logit_processor positional_embed_overrides bootstrap_host bootstrap_port bootstrap_room
    bootstrap_pair_key decode_tp_size routed_dp_rank data_parallel_rank disagg_prefill_dp_rank
    routing_key conversation_id http_worker_ipc background require_reasoning max_thinking_tokens
    priority extra_key no_logs custom_labels return_bytes return_entropy return_prompt_token_ids
    external_trace_header received_time need_wait_for_mm_inputs num_items_assigned encoder_urls
    max_dynamic_patch min_dynamic_patch image_max_dynamic_patch video_max_dynamic_patch images_config
    mm_processor_kwargs multi_item_delimiter_indices token_indices_to_pool cache_salt kv_hints
    input_extra_infos
""".split()

EMBEDDING_FIELDS = """
    rid text input_ids input_embeds image_data video_data audio_data embed_override_token_id
    embed_overrides sampling_params log_metrics modalities is_cross_encoder_request lora_path lora_id
    positional_embed_overrides routing_key http_worker_ipc background priority dimensions
    return_pooled_hidden_states return_prompt_token_ids external_trace_header received_time
    multi_item_delimiter_indices token_indices_to_pool decision_layout model
""".split()   # "model": SGLang's embedding examples send it; one model is served

HARMLESS = frozenset("""
    log_metrics no_logs custom_labels external_trace_header received_time http_worker_ipc routing_key
    conversation_id model need_wait_for_mm_inputs num_items_assigned
""".split())

# SGLang's default when it is not an "off" value
DEFAULTS = {"logprob_start_len": -1, "top_logprobs_num": 0, "routed_experts_start_len": 0,
            "sampling_logprobs_mode": "processed"}

PICKLED_PROCESSOR = ("custom_logit_processor: pickled logit processors are not supported by kvyard; "
                     "register a logit processor plugin and select it by name with "
                     "custom_logit_processor (see docs/sglang-compat.md)")


def _is_off(name: str, value) -> bool:
    if name in DEFAULTS and value == DEFAULTS[name]:
        return True
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def check_fields(obj: dict, acted: set[str], sglang_fields: list[str]) -> None:
    """RequestError naming the first field kvyard cannot honour; silent otherwise."""
    for name in sorted(set(obj) - acted):
        value = obj[name]
        if name not in sglang_fields:
            raise RequestError(f"unknown request field {name!r}", param=name)
        if name in HARMLESS or _is_off(name, value):
            continue
        if name == "custom_logit_processor":
            raise RequestError(PICKLED_PROCESSOR, param=name)
        raise RequestError(f"{name}: not supported by kvyard", param=name)


def drop_ignored(obj: dict, acted: set[str]) -> dict:
    """The request with only the fields kvyard acts on (call check_fields first)."""
    return {k: v for k, v in obj.items() if k in acted}


def check_logit_processor(name, enabled: bool) -> None:
    """A request's ``custom_logit_processor`` must name a registered logit processor, on a server
    started with --enable-custom-logit-processor; SGLang's serialized (pickled) processors are
    refused: no code travels with a request."""
    from kvyard.plugins import registry

    field = "custom_logit_processor"
    if not isinstance(name, str):
        raise RequestError(f"{field}: must be the name of a registered logit processor", param=field)
    known = registry("logit_processors")
    if name not in known:
        if name.lstrip().startswith("{") or len(name) > 64:
            raise RequestError(PICKLED_PROCESSOR, param=field)
        raise RequestError(f"{field}: {known.unknown_message(name)}", param=field)
    if not enabled:
        raise RequestError(f"{field}: the server selects no logit processors per request; start it with "
                           "--enable-custom-logit-processor", param=field)
