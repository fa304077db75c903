"""Engine adapters: each turns one serving engine's per-step objects into `steps` / `experts` rows.

`hf` — HF transformers (continuous batching and `generate`), in-process; `hf_runner` loads a model
and runs a workload on it. Adapters import their engine lazily, so this package imports without them.
"""
