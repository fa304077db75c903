"""Real vLLM objects for the adapter tests: scheduler outputs, a toy scheduler that follows vLLM's rules,
a tiny MoE model routed by vLLM's real router classes, and a model runner standing in for the GPU one.

Everything imports vLLM lazily, so this module can be imported (not used) without vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY_CONFIG = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
    "norm_topk_prob": False,
    "torch_dtype": "float32",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
MOE_LAYERS = (0, 2)
NUM_EXPERTS = 8
TOP_K = 2
HIDDEN = 64


def write_tiny_config(folder: Path) -> Path:
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


# ---------------------------------------------------------------------------------------------------
# Scheduler outputs (the real dataclasses, whatever fields the installed release requires)
# ---------------------------------------------------------------------------------------------------
def _construct(cls: Any, **values: Any) -> Any:
    """Build a vLLM dataclass from `values`, giving every other required field an empty value."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _EMPTY.get(f.name)
    return cls(**kwargs)


_EMPTY: dict[str, Any] = {
    "mm_features": [],
    "sampling_params": None,
    "pooling_params": None,
    "block_ids": ([],),
    "lora_request": None,
    "scheduled_encoder_inputs": {},
    "free_encoder_mm_hashes": [],
    "num_common_prefix_blocks": [],
    "finished_req_ids": set(),
    "scheduled_spec_decode_tokens": {},
}


def new_request(
    req_id: str,
    prompt_token_ids: list[int],
    num_computed_tokens: int = 0,
    prefill_token_ids: list[int] | None = None,
) -> Any:
    from vllm.v1.core.sched.output import NewRequestData

    values: dict[str, Any] = {
        "req_id": req_id,
        "prompt_token_ids": prompt_token_ids,
        "num_computed_tokens": num_computed_tokens,
    }
    if prefill_token_ids is not None:
        values["prefill_token_ids"] = prefill_token_ids
    return _construct(NewRequestData, **values)


def cached_requests(
    req_ids: list[str],
    num_computed_tokens: list[int],
    num_output_tokens: list[int],
    resumed: set[str] | None = None,
    all_token_ids: dict[str, list[int]] | None = None,
) -> Any:
    from vllm.v1.core.sched.output import CachedRequestData

    return CachedRequestData(
        req_ids=list(req_ids),
        resumed_req_ids=set(resumed or ()),
        new_token_ids=[],
        all_token_ids=dict(all_token_ids or {}),
        new_block_ids=[None] * len(req_ids),
        num_computed_tokens=list(num_computed_tokens),
        num_output_tokens=list(num_output_tokens),
    )


def scheduler_output(
    new: list[Any],
    cached: Any,
    num_scheduled_tokens: dict[str, int],
    spec: dict[str, list[int]] | None = None,
    finished: set[str] | None = None,
    preempted: set[str] | None = None,
) -> Any:
    from vllm.v1.core.sched.output import SchedulerOutput

    return _construct(
        SchedulerOutput,
        scheduled_new_reqs=new,
        scheduled_cached_reqs=cached,
        num_scheduled_tokens=dict(num_scheduled_tokens),
        total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
        scheduled_spec_decode_tokens=dict(spec or {}),
        finished_req_ids=set(finished or ()),
        preempted_req_ids=set(preempted) if preempted is not None else None,
    )


# ---------------------------------------------------------------------------------------------------
# A toy scheduler following vLLM's rules, with the ground truth of every step
# ---------------------------------------------------------------------------------------------------
@dataclass
class ToyRequest:
    req_id: str
    prompt: list[int]
    max_tokens: int
    prefix_hit: int = 0
    outputs: list[int] = field(default_factory=list)
    computed: int = 0
    target: int = 0
    status: str = "waiting"
    preempted: bool = False
    scheduled_once: bool = False


@dataclass
class Truth:
    """What one scheduled request really does in a step."""

    prefix: int
    new: int
    spec: int
    prefilling: bool
    logits: int


class ToyScheduler:
    """Schedules like vLLM's V1 scheduler, in miniature: a token budget per step, running requests
    first (a decode needs 1 + drafts, a prefill the rest of its prompt, chunked to the budget), then
    waiting ones (new, or preempted and resumed); `num_computed_tokens` reported before the step;
    prefix-cache hits in `NewRequestData.num_computed_tokens`; finished ids reported one step late;
    preemption resets the cache and the request comes back either as a cached request in
    `resumed_req_ids` (model runner V1) or as a new request with `prefill_token_ids` (V2)."""

    def __init__(self, budget: int, *, runner: str = "v2", spec_k: int = 0, seed: int = 0) -> None:
        self.budget = budget
        self.runner = runner
        self.spec_k = spec_k
        self.rng = random.Random(seed)
        self.requests: dict[str, ToyRequest] = {}
        self.order: list[str] = []
        self.finished_pending: set[str] = set()
        self.preempted_pending: set[str] = set()

    def add(self, req_id: str, prompt_len: int, max_tokens: int, prefix_hit: int = 0) -> None:
        prompt = [self.rng.randrange(1, 200) for _ in range(prompt_len)]
        self.requests[req_id] = ToyRequest(
            req_id, prompt, max_tokens, prefix_hit=prefix_hit, target=prompt_len
        )
        self.order.append(req_id)

    def preempt(self, req_id: str) -> None:
        r = self.requests[req_id]
        assert r.status == "running"
        r.status, r.computed, r.preempted = "waiting", 0, True
        r.target = len(r.prompt) + len(r.outputs)
        self.preempted_pending.add(req_id)

    def step(self, *, idle: bool = False) -> tuple[Any, dict[str, Truth]]:
        budget = 0 if idle else self.budget
        new_data, cached_ids, cached_computed, cached_outputs = [], [], [], []
        resumed: set[str] = set()
        all_tokens: dict[str, list[int]] = {}
        counts: dict[str, int] = {}
        spec: dict[str, list[int]] = {}
        truth: dict[str, Truth] = {}
        for rid in list(self.order):
            r = self.requests[rid]
            if budget <= 0 or r.status == "finished":
                continue
            if r.status == "waiting":
                hit = 0 if r.preempted else min(r.prefix_hit, len(r.prompt) - 1)
                r.computed = hit
            decoding = r.computed >= r.target
            k = min(self.spec_k, r.max_tokens - len(r.outputs) - 1) if decoding and self.spec_k else 0
            need = 1 + k if decoding else r.target - r.computed
            n = min(need, budget)
            if decoding and n < need:
                continue  # vLLM never splits a decode step
            budget -= n
            counts[rid] = n
            if k:
                spec[rid] = [self.rng.randrange(1, 200) for _ in range(k)]
            truth[rid] = Truth(
                r.computed, n, k, r.computed < r.target, (1 + k) if r.computed + n - k >= r.target else 0
            )
            if r.status == "waiting":
                if r.preempted and self.runner == "v1":
                    cached_ids.append(rid)
                    cached_computed.append(r.computed)
                    cached_outputs.append(len(r.outputs))
                    resumed.add(rid)
                    all_tokens[rid] = r.prompt + r.outputs
                else:
                    prefill = r.prompt + r.outputs if self.runner == "v2" else None
                    new_data.append(new_request(rid, list(r.prompt), r.computed, prefill))
                r.status = "running"
            else:
                cached_ids.append(rid)
                cached_computed.append(r.computed)
                cached_outputs.append(len(r.outputs))
        so = scheduler_output(
            new_data,
            cached_requests(cached_ids, cached_computed, cached_outputs, resumed, all_tokens),
            counts,
            spec,
            finished=self.finished_pending,
            preempted=self.preempted_pending if self.runner == "v2" else None,
        )
        self.finished_pending, self.preempted_pending = set(), set()
        # After the step (what update_from_output does): sample, accept some drafts, finish.
        for rid, t in truth.items():
            r = self.requests[rid]
            r.computed += t.new
            if t.logits:
                accepted = self.rng.randint(0, t.spec) if t.spec else 0
                r.computed -= t.spec - accepted
                r.outputs.extend(self.rng.randrange(1, 200) for _ in range(1 + accepted))
                if len(r.outputs) >= r.max_tokens:
                    r.status = "finished"
                    self.finished_pending.add(rid)
        return so, truth

    def done(self) -> bool:
        return all(r.status == "finished" for r in self.requests.values())


# ---------------------------------------------------------------------------------------------------
# A tiny MoE model routed by vLLM's real routers, and a model runner around it
# ---------------------------------------------------------------------------------------------------
def make_router(kind: str, plan: Any = None) -> Any:
    """A real vLLM router: `softmax` = `CPURouter` (0.33; plain torch top-k) or, where that class does
    not exist, `CustomRoutingRouter` with a softmax top-k; `plan` = `CustomRoutingRouter` returning the
    ids `plan(num_rows)` gives (duplicates allowed)."""
    import torch

    if kind == "softmax":
        try:
            from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

            return CPURouter(top_k=TOP_K, global_num_experts=NUM_EXPERTS)
        except ImportError:
            plan = None

            def softmax_topk(hidden_states, gating_output, topk, renormalize):
                vals, ids = torch.topk(gating_output, k=topk, dim=-1)
                return torch.softmax(vals, dim=-1), ids.to(torch.int32)

            from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter

            return CustomRoutingRouter(
                top_k=TOP_K, global_num_experts=NUM_EXPERTS, custom_routing_function=softmax_topk
            )
    from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter

    def planned(hidden_states, gating_output, topk, renormalize):
        ids = plan(int(gating_output.shape[0]))
        return torch.full(ids.shape, 1.0 / topk), ids

    return CustomRoutingRouter(top_k=TOP_K, global_num_experts=NUM_EXPERTS, custom_routing_function=planned)


def make_model(router_kind: str = "softmax", plans: dict[int, Any] | None = None) -> Any:
    """Three decoder layers; layers 0 and 2 are MoE blocks shaped like vLLM's `MoERunner` (a
    `layer_name`, `layer_id` from vLLM's own `extract_layer_index`, a real router as a plain attribute,
    `is_monolithic`), layer 1 dense."""
    import torch
    from torch import nn
    from vllm.model_executor.models.utils import extract_layer_index

    class MoEBlock(nn.Module):
        def __init__(self, index: int, router: Any) -> None:
            super().__init__()
            self.layer_name = f"model.layers.{index}.mlp.experts"
            self.router = router
            self.gate = nn.Linear(HIDDEN, NUM_EXPERTS, bias=False)
            self.experts = nn.Parameter(torch.randn(NUM_EXPERTS, HIDDEN) * 0.01)
            self.is_monolithic = False

        @property
        def layer_id(self) -> int:
            return extract_layer_index(self.layer_name)

        def forward(self, x: Any) -> Any:
            weights, ids = self.router.select_experts(x, self.gate(x))
            return x + (weights.unsqueeze(-1) * self.experts[ids.long()]).sum(1)

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x: Any) -> Any:
            return x + self.proj(x)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            plans_ = plans or {}
            self.start_layer, self.end_layer = 0, 3
            self.layers = nn.ModuleList(
                [
                    MoEBlock(i, make_router("plan" if i in plans_ else router_kind, plans_.get(i)))
                    if i in MOE_LAYERS
                    else Dense()
                    for i in range(3)
                ]
            )

        def forward(self, x: Any) -> Any:
            for layer in self.layers:
                x = layer(x)
            return x

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

        def forward(self, x: Any) -> Any:
            return self.model(x)

    torch.manual_seed(0)
    return Model().eval()


class FakeRunner:
    """Stands in for vLLM's GPU model runner under the real `Worker`: runs the tiny model over the
    step's tokens padded to a 'graph size' with junk rows (as CUDA-graph padding does), and remembers
    the hidden states it fed so a test can recompute the routing of the real rows."""

    def __init__(self, model: Any, pad_to: int = 8) -> None:
        self.model = model
        self.pad_to = pad_to
        self.inputs: list[tuple[Any, int]] = []
        self.sampled = 0
        self.dummy_runs = 0
        self.loaded = False

    def load_model(self, load_dummy_weights: bool = False, **_: Any) -> None:
        self.loaded = True

    def get_model(self) -> Any:
        return self.model

    def initialize_kv_cache(self, kv_cache_config: Any, **_: Any) -> None:
        self.kv_cache_config = kv_cache_config

    def _forward(self, n_real: int) -> None:
        import torch

        padded = max(self.pad_to, -(-n_real // self.pad_to) * self.pad_to + self.pad_to // 2)
        x = torch.randn(padded, HIDDEN)
        x[n_real:] = 7.0  # junk padding rows: they route somewhere, and must never count
        self.inputs.append((x.clone(), n_real))
        with torch.no_grad():
            self.model(x)

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        if scheduler_output.total_num_scheduled_tokens == 0:
            from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

            return EMPTY_MODEL_RUNNER_OUTPUT
        self._forward(int(scheduler_output.total_num_scheduled_tokens))
        return None

    def sample_tokens(self, grammar_output: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        self.sampled += 1
        return EMPTY_MODEL_RUNNER_OUTPUT

    def _dummy_run(self, num_tokens: int, **_: Any) -> Any:
        self.dummy_runs += 1
        self._forward(0)

    def shutdown(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# vLLM config and process groups on the CPU
# ---------------------------------------------------------------------------------------------------
@dataclass
class VllmEnv:
    config: Any
    init_method: str


def init_vllm(config_dir: Path) -> VllmEnv:
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    mc = ModelConfig(model=str(config_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=256)
    vc = VllmConfig(model_config=mc)
    init = f"file://{tempfile.mktemp(prefix='moecap-vllm-dist-')}"
    if not model_parallel_is_initialized():
        with set_current_vllm_config(vc):
            init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=init, local_rank=0, backend="gloo"
            )
            initialize_model_parallel(1, 1)
    return VllmEnv(vc, init)


def make_worker(env: VllmEnv, runner: FakeRunner) -> Any:
    """A real `vllm.v1.worker.gpu_worker.Worker` (constructor and all) whose model runner is `runner`."""
    import torch
    from vllm.v1.worker.gpu_worker import Worker

    worker = Worker(
        vllm_config=env.config,
        local_rank=0,
        rank=0,
        distributed_init_method=env.init_method,
        is_driver_worker=True,
    )
    worker.device = torch.device("cpu")
    worker.model_runner = runner
    return worker


def kv_cache_config(num_layers: int = 3, block_size: int = 16, heads: int = 2, head_size: int = 16) -> Any:
    """A real `KVCacheConfig`: one full-attention group over every decoder layer (float32 K and V:
    2 × heads × head_size × 4 bytes per token per layer)."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=heads, head_size=head_size, dtype=torch.float32
    )
    group = KVCacheGroupSpec(
        layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(num_layers)], kv_cache_spec=spec
    )
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[group])
