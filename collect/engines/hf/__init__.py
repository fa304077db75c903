"""HF transformers, in this process: the per-step collector on its continuous batching and `generate`
(`adapter`), and the runner that loads a model and runs a workload on it (`runner`)."""
