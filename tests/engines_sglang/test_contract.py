"""The SGLang fields and signatures the adapter relies on, per supported release: a change fails here
loudly instead of silently recording nothing on a GPU."""

from __future__ import annotations

import dataclasses
import inspect

from moecap.collect.engines.sglang import compat


def test_release_is_supported(sglang_version):
    assert compat.version_problem(sglang_version) is None


def test_model_runner_forward_signature_and_pass_id(sglang_version):
    from sglang.srt.model_executor.model_runner import ModelRunner

    forward = inspect.unwrap(ModelRunner.forward)
    assert tuple(inspect.signature(forward).parameters) == compat.FORWARD_PARAMS
    src = inspect.getsource(forward)
    assert "self.forward_pass_id += 1" in src and "with_forward_pass(" in src
    assert "self.is_draft_worker = is_draft_worker" in inspect.getsource(ModelRunner.__init__)


def test_forward_batch_fields_and_modes(sglang_version):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    names = {f.name for f in dataclasses.fields(ForwardBatch)}
    assert set(compat.FORWARD_BATCH_FIELDS) <= names, set(compat.FORWARD_BATCH_FIELDS) - names
    assert tuple(m.name for m in ForwardMode) == compat.FORWARD_MODES
    assert [m.value for m in ForwardMode] == list(range(1, len(compat.FORWARD_MODES) + 1))


def test_hook_registry_and_plugin_group(sglang_version):
    import sglang.srt.plugins as plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    assert plugins.GENERAL_PLUGINS_GROUP == compat.PLUGIN_GROUP
    assert {"BEFORE", "AFTER", "AROUND", "REPLACE"} <= {t.name for t in HookType}
    params = list(inspect.signature(HookRegistry.register).parameters)
    assert params[:3] == ["target", "hook", "hook_type"]
    from sglang.srt.managers import scheduler

    assert "load_plugins()" in inspect.getsource(scheduler.run_scheduler_process)


def test_recorder_gatherer_and_location_metadata(sglang_version):
    from sglang.srt.eplb import expert_distribution as ed
    from sglang.srt.eplb import expert_location as el

    real = ed._ExpertDistributionRecorderReal
    for name in ("with_forward_pass", "with_current_layer", "on_select_experts", "start_record", "recording"):
        assert hasattr(real, name), name
    src = inspect.getsource(real)
    assert "_single_pass_gatherers" in src and "gatherer.reset()" in inspect.getsource(
        real._on_forward_pass_start
    )
    assert "is_current_stream_capturing()" in inspect.getsource(real._on_hook), (
        "graph capture bakes the count in"
    )
    g = inspect.getsource(ed._SelectExpertsSinglePassGatherer.on_select_experts)
    # 0.5.23 masks ids outside [0, E_phys), 0.5.16 only -1: either way padded rows never count.
    assert "scatter_add_" in g and ("num_physical_experts" in g or "!= -1" in g)
    assert "self._data = torch.zeros" in inspect.getsource(ed._LayerBasedGpuSinglePassGatherer.__init__)
    assert callable(el.get_global_expert_location_metadata)
    assert {"physical_to_logical_map"} <= {f.name for f in dataclasses.fields(el.ExpertLocationMetadata)}
    assert callable(ed.get_global_expert_distribution_recorder)


def test_server_args_the_launchers_pass(sglang_version):
    from sglang.srt.server_args import ServerArgs

    names = set(compat.server_arg_names(ServerArgs))
    needed = {"expert_distribution_recorder_mode", "expert_distribution_recorder_buffer_size", "load_format",
              "skip_tokenizer_init", "mem_fraction_static", "chunked_prefill_size", "context_length",
              "moe_a2a_backend", "disable_overlap_schedule", "random_seed", "log_level"}  # fmt: skip
    assert needed <= names, needed - names


def test_engine_takes_a_scheduler_launcher(sglang_version):
    from sglang.srt.entrypoints.engine import Engine

    assert "run_scheduler_process_func" in inspect.getsource(Engine)


def test_padding_mask_hook_points(sglang_version):
    # The live-token mask patches the select-experts gatherer and allocates before graph capture.
    import importlib
    import inspect

    from moecap.collect.engines.sglang import compat

    module_name, _, method = compat.CAPTURE_TARGET.rpartition(".")
    module_name, _, cls_name = module_name.rpartition(".")
    runner = getattr(importlib.import_module(module_name), cls_name)
    assert callable(getattr(runner, method, None)), f"{compat.CAPTURE_TARGET} is gone"
    worker = importlib.import_module("sglang.srt.managers.tp_worker")
    assert "model_runner.init_cuda_graphs(" in inspect.getsource(worker), "graphs are captured elsewhere"
    gatherer = getattr(importlib.import_module(compat.GATHERER_CLASS[0]), compat.GATHERER_CLASS[1])
    params = list(inspect.signature(gatherer.on_select_experts).parameters)
    assert params == ["self", "layer_idx", "topk_ids"], params
