"""vLLM: the plugin recording every worker's steps (`adapter`), what it reads from each release (`compat`),
and the offline runner / server command line (`runner`).

`register` is the `vllm.general_plugins` entry point (`moecap.collect.engines.vllm:register`); vLLM calls it
in every process, so this package imports nothing of vLLM until a worker module loads."""

from __future__ import annotations


def register() -> None:
    """The entry point: `adapter.register` (inert unless MOECAP_TRACE_DIR is set)."""
    from .adapter import register as _register

    _register()
