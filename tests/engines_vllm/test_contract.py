"""The contract with vLLM: every field, signature and call order the adapter relies on, checked against
the installed release's real classes (CI runs this file for 0.33.0 and 0.26.0). A failure here means
vLLM changed something `vllm_compat.py` depends on."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest

pytest.importorskip("vllm")

from moecap.collect.engines.vllm import compat


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def original(fn):
    return getattr(fn, "__moecap_wrapped__", fn)


def params(fn) -> list[str]:
    return list(inspect.signature(original(fn)).parameters)


def test_release_is_in_the_supported_range(vllm_version):
    assert compat.version_problem(vllm_version) is None
    assert vllm_version in compat.VALIDATED


def test_scheduler_output_fields(vllm_version):
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    assert {
        "scheduled_new_reqs",
        "scheduled_cached_reqs",
        "num_scheduled_tokens",
        "total_num_scheduled_tokens",
        "scheduled_spec_decode_tokens",
        "finished_req_ids",
        "preempted_req_ids",
    } <= fields(SchedulerOutput)
    assert {
        "req_id",
        "prompt_token_ids",
        "prompt_embeds",
        "num_computed_tokens",
        "prefill_token_ids",
    } <= fields(NewRequestData)
    assert {
        "req_ids",
        "resumed_req_ids",
        "all_token_ids",
        "num_computed_tokens",
        "num_output_tokens",
    } <= fields(CachedRequestData)
    assert callable(CachedRequestData.is_context_phase)


def test_profile_matches_the_release(vllm_version):
    """The version table in vllm_compat tells the truth about the releases it names."""
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker import ubatching

    prof = compat.profile()
    assert prof is compat.profile_for(vllm_version)
    assert isinstance(getattr(NewRequestData, "prompt_len", None), property) == prof.new_request_prompt_len
    assert hasattr(ubatching, "dbo_current_ubatch_token_offset") == prof.ubatch_token_offset
    required = {
        f.name
        for f in dataclasses.fields(SchedulerOutput)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert ("num_common_prefix_blocks" in required) == prof.scheduler_output_common_prefix_required
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsCaptureSource  # noqa: F401

        has_protocol = True
    except ImportError:
        has_protocol = False
    assert has_protocol == prof.capture_source_protocol


def test_worker_methods_and_signatures(vllm_version):
    Worker = compat.worker_class()
    assert params(Worker.execute_model) == ["self", "scheduler_output"]
    assert params(Worker.sample_tokens) == ["self", "grammar_output"]
    assert params(Worker.execute_dummy_batch) == ["self"]
    assert params(Worker.initialize_from_config) == ["self", "kv_cache_config"]
    assert params(Worker.shutdown) == ["self"]
    assert params(Worker.compile_or_warm_up_model) == ["self"]
    load = inspect.signature(original(Worker.load_model))
    assert next(iter(load.parameters)) == "self"
    assert all(p.default is not inspect.Parameter.empty for p in list(load.parameters.values())[1:])


def test_worker_base_loads_general_plugins_before_building_the_worker(vllm_version):
    import vllm.plugins
    from vllm.v1.worker import worker_base

    assert vllm.plugins.DEFAULT_PLUGINS_GROUP == compat.PLUGIN_GROUP
    assert "load_general_plugins()" in inspect.getsource(worker_base)


def test_router_captures_logical_ids_before_the_eplb_mapping(vllm_version):
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    assert params(BaseRouter.set_capture_fn) == ["self", "capture_fn"]
    tree = ast.parse(textwrap.dedent(inspect.getsource(BaseRouter._select_experts)))
    lines = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            lines.setdefault(node.func.attr, node.lineno)
    assert lines["_compute_routing"] < lines["capture_fn"] < lines["_apply_eplb_mapping"]


def test_moe_runner_shape(vllm_version):
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    assert isinstance(inspect.getattr_static(MoERunner, "layer_id"), property)
    assert isinstance(inspect.getattr_static(MoERunner, "is_monolithic"), property)
    assert "self.router = router" in inspect.getsource(MoERunner.__init__)
    from vllm.model_executor.models.utils import extract_layer_index

    assert extract_layer_index("model.layers.17.mlp.experts") == 17


def test_forward_context_and_parallel_state(vllm_version):
    from vllm import forward_context as fc
    from vllm.distributed import parallel_state as ps

    assert {"dp_metadata", "batch_descriptor"} <= fields(fc.ForwardContext)
    assert {"num_tokens_across_dp_cpu", "local_sizes"} <= fields(fc.DPMetadata)
    assert callable(fc.is_forward_context_available) and callable(fc.get_forward_context)
    for name in ("get_tp_group", "get_pp_group", "get_ep_group"):
        assert callable(getattr(ps, name))
    source = inspect.getsource(ps.GroupCoordinator)
    for attr in ("self.rank_in_group", "self.world_size", "self.ranks", "def all_gather"):
        assert attr in source


def test_kv_cache_config_shape(vllm_version):
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheGroupSpec

    assert "kv_cache_groups" in fields(KVCacheConfig)
    assert {"layer_names", "kv_cache_spec"} <= fields(KVCacheGroupSpec)
    assert isinstance(inspect.getattr_static(AttentionSpec, "page_size_bytes"), property)
    assert "block_size" in fields(AttentionSpec)


def test_config_facts_the_metadata_reads(vllm_version):
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig

    assert {"max_num_batched_tokens", "max_num_seqs"} <= fields(SchedulerConfig)
    assert {"block_size", "cache_dtype"} <= fields(CacheConfig)
    assert {
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "data_parallel_rank",
    } <= fields(ParallelConfig)
    assert callable(ModelConfig.get_num_experts) and callable(ModelConfig.get_total_num_hidden_layers)


def test_offline_engine_api_the_run_command_uses(vllm_version):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    assert {"request_id", "prompt", "params"} <= set(params(LLMEngine.add_request))
    assert inspect.signature(LLMEngine.add_request).return_annotation in ("str", str)
    assert {"step", "has_unfinished_requests", "from_engine_args", "collective_rpc"} <= set(dir(LLMEngine))
    assert {
        "model",
        "load_format",
        "skip_tokenizer_init",
        "enforce_eager",
        "seed",
        "max_num_batched_tokens",
    } <= fields(EngineArgs)
