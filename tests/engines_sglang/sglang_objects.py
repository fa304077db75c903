"""Real SGLang objects for the CPU tests, and the few stand-ins for what needs a GPU.

Real: `ForwardBatch`, `ForwardMode`, `ModelRunner.forward` (its own body runs), `HookRegistry`,
`ExpertLocationMetadata` and the select-experts gatherer `_SelectExpertsSinglePassGatherer` (its own
`reset` / `on_select_experts` run). Stand-ins: the model's forward (`ModelRunner._forward_raw`, which
here routes known `topk_ids` through the gatherer, padded rows as −1, and then pads the batch the way
SGLang's graph runner does), and a recorder wrapper with the real recorder's method names (the real one
reads GPU-only server state to construct; `test_contract.py` checks the names against it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any

import torch

L, E, K = 3, 8, 2
"""Recorder layers (decoder layers 0..2, all MoE), experts, top-k of the tiny model."""


def location_metadata(num_layers: int = L, num_experts: int = E, p2l: torch.Tensor | None = None) -> Any:
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    if p2l is None:
        p2l = torch.arange(num_experts).repeat(num_layers, 1)
    n_phys = p2l.shape[1]
    n_log = int(p2l.max()) + 1
    names = {f.name for f in dataclasses.fields(ExpertLocationMetadata)}
    kw = dict(
        physical_to_logical_map=p2l,
        physical_to_logical_map_cpu=p2l,
        logical_to_all_physical_map=torch.full((num_layers, n_log, n_phys), -1),
        logical_to_all_physical_map_cpu=torch.full((num_layers, n_log, n_phys), -1),
        logical_to_all_physical_map_num_valid=torch.ones(num_layers, n_log, dtype=torch.long),
        ep_size=1,
        logical_to_rank_dispatch_physical_map=None,
    )
    return ExpertLocationMetadata(**{k: v for k, v in kw.items() if k in names})


class Recorder:
    """SGLang's recorder protocol around the REAL select-experts gatherer: `with_forward_pass` resets
    the gatherer at pass start (as `_ExpertDistributionRecorderReal._on_forward_pass_start` does)."""

    def __init__(self, metadata: Any) -> None:
        from sglang.srt.eplb import expert_distribution as ed

        self._single_pass_gatherers = {"primary": ed._SelectExpertsSinglePassGatherer(metadata, 0)}
        self._recording = False
        self._layer: int | None = None
        self.starts = 0

    @property
    def recording(self) -> bool:
        return self._recording

    def start_record(self) -> None:
        self.starts += 1
        self._recording = True
        self._single_pass_gatherers["primary"].reset()

    @contextlib.contextmanager
    def with_forward_pass(self, forward_pass_id: int, forward_batch: Any):
        if self._recording:
            self._single_pass_gatherers["primary"].reset()
        yield {}

    @contextlib.contextmanager
    def with_current_layer(self, layer_idx: int):
        self._layer = layer_idx
        yield
        self._layer = None

    def on_select_experts(self, topk_ids: torch.Tensor) -> None:
        self._single_pass_gatherers["primary"].on_select_experts(layer_idx=self._layer, topk_ids=topk_ids)


@dataclasses.dataclass
class ServerArgsStub:
    """The `ModelRunner.server_args` fields `forward` and the adapter read (a real `ServerArgs` resolves
    a model and a device in `__post_init__`)."""

    expert_distribution_recorder_mode: str | None = "stat"
    disable_overlap_schedule: bool = False
    elastic_ep_backend: str | None = None
    load_format: str = "dummy"
    model_path: str = "tiny-qwen2-moe"
    served_model_name: str | None = None
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    moe_a2a_backend: str = "none"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None


def hf_config() -> Any:
    return types.SimpleNamespace(
        num_hidden_layers=L,
        num_experts=E,
        num_experts_per_tok=K,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        to_dict=lambda: {
            "model_type": "qwen2_moe",
            "num_hidden_layers": L,
            "num_experts": E,
            "num_experts_per_tok": K,
        },
    )


def make_batch(mode: str, rids: list[str], **fields: Any) -> Any:
    """A real `ForwardBatch` with the host fields the scheduler fills."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    n = len(rids)
    seq = fields.pop("seq_lens", [1] * n)
    tokens = fields.pop("tokens", sum(fields.get("extend_seq_lens_cpu") or [1] * n))
    return ForwardBatch(
        forward_mode=getattr(ForwardMode, mode),
        batch_size=n,
        input_ids=torch.zeros(max(tokens, 1), dtype=torch.long),
        req_pool_indices=torch.zeros(n, dtype=torch.long),
        seq_lens=torch.tensor(seq, dtype=torch.long),
        out_cache_loc=torch.zeros(max(tokens, 1), dtype=torch.long),
        seq_lens_sum=sum(seq),
        rids=list(rids),
        seq_lens_cpu=torch.tensor(seq, dtype=torch.long),
        **fields,
    )


class Sgl:
    """One test's SGLang world: the real classes, the adapter reset, the hook applied to ModelRunner."""

    def __init__(self, monkeypatch: Any, tmp_path: Any) -> None:
        from sglang.srt.eplb import expert_distribution as ed
        from sglang.srt.model_executor import model_runner as mr
        from sglang.srt.plugins.hook_registry import HookRegistry

        from moecap.collect.engines.sglang import adapter

        self.mp = monkeypatch
        self.adapter = adapter
        self.ed = ed
        self.mr = mr
        self.trace_dir = tmp_path / "trace"
        self.ModelRunner = mr.ModelRunner
        self.HookRegistry = HookRegistry
        self._original_forward = mr.ModelRunner.__dict__["forward"]
        # The gatherer allocates on SGLang's accelerator; this host has none.
        monkeypatch.setattr(ed, "get_device", lambda *a, **k: "cpu", raising=False)
        if hasattr(mr, "get_schedule"):  # 0.5.23 reads the published schedule config in forward
            monkeypatch.setattr(
                mr, "get_schedule", lambda: types.SimpleNamespace(disable_overlap_schedule=False)
            )
        if hasattr(mr, "get_exec"):  # … and the published exec config (MoE elastic-EP backend)
            exec_ns = types.SimpleNamespace(moe=types.SimpleNamespace(elastic_ep_backend=None))
            monkeypatch.setattr(mr, "get_exec", lambda: exec_ns)
        monkeypatch.setenv("MOECAP_TRACE_DIR", str(self.trace_dir))
        monkeypatch.setenv("MOECAP_RUN_ID", "test-sglang-run")
        monkeypatch.delenv("MOECAP_COUNTS", raising=False)
        adapter._reset_for_tests()
        self.recorder: Recorder | None = None

    def install(self) -> None:
        """register() + HookRegistry.apply_hooks(), as SGLang's load_plugins() does in a scheduler."""
        self.adapter.register()
        self.HookRegistry.apply_hooks()

    def set_recorder(self, metadata: Any | None = None) -> Recorder:
        from sglang.srt.eplb import expert_location as el

        meta = metadata if metadata is not None else location_metadata()
        self.recorder = Recorder(meta)
        self.mp.setattr(self.ed, "get_global_expert_distribution_recorder", lambda: self.recorder)
        self.mp.setattr(self.mr, "get_global_expert_distribution_recorder", lambda: self.recorder)
        self.mp.setattr(el, "get_global_expert_location_metadata", lambda: meta)
        return self.recorder

    def runner(self, routing: list[torch.Tensor] | None = None, *, draft: bool = False, mode: str | None = "stat",
               pad_to: int | None = None) -> Any:  # fmt: skip
        """A `ModelRunner` whose real `forward` runs; `_forward_raw` routes `routing[i]` (one [rows, K]
        tensor per pass, −1 for padding rows) through the recorder per layer, then pads the batch."""
        r = self.ModelRunner.__new__(self.ModelRunner)
        r.forward_pass_id = 0
        r.is_draft_worker = draft
        r.msprobe_debugger = None
        r.canary_manager = None
        r.enable_elastic_ep = False
        r.eplb_manager = None
        r.decode_cuda_graph_runner = None
        r.device = "cpu"
        r.gpu_id = 0
        r.server_args = ServerArgsStub(expert_distribution_recorder_mode=mode)
        r.model_config = types.SimpleNamespace(hf_config=hf_config(), dtype=torch.bfloat16)
        r.model = torch.nn.Module()
        queue = list(routing or [])
        env = self

        def forward_raw(forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
            rec = env.recorder
            if queue and rec is not None:
                ids = queue.pop(0)
                for layer in range(L):
                    with rec.with_current_layer(layer):
                        rec.on_select_experts(topk_ids=ids)
            if pad_to is not None:  # what the graph runner / DP padding does to the batch
                forward_batch.batch_size = pad_to
                if forward_batch.extend_seq_lens_cpu is not None:
                    forward_batch.extend_seq_lens_cpu = list(forward_batch.extend_seq_lens_cpu) + [0] * 4
                forward_batch.rids = list(forward_batch.rids or []) + ["pad"] * 4
            return types.SimpleNamespace(can_run_graph=pad_to is not None)

        r._forward_raw = forward_raw
        return r

    def rows(self) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
        """Close the tracer and read its files back through moecap.schemas."""
        from moecap.schemas import read_trace_file

        tracer = self.adapter.current_tracer()
        if tracer is not None:
            tracer.close()
        steps = sorted(self.trace_dir.glob("*.steps.arrow"))
        if not steps:
            return [], {}
        s = read_trace_file(steps[0])
        experts = sorted(self.trace_dir.glob("*.experts.arrow"))
        counts = {}
        if experts:
            counts = {r["step"]: r["counts"] for r in read_trace_file(experts[0]).table.to_pylist()}
        self.meta = s.run
        return s.table.to_pylist(), counts

    def close(self) -> None:
        self.adapter._reset_for_tests()
        self.HookRegistry.reset()
        self.ModelRunner.forward = self._original_forward
