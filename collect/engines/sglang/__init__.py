"""SGLang: the plugin recording every scheduler's passes (`adapter`), what it reads from each release
(`compat`), the offline runner / server command line (`runner`), and the importer of SGLang's own
expert-distribution dumps (`dump`).

`register` is the `sglang.srt.plugins` entry point (`moecap.collect.engines.sglang:register`)."""

from __future__ import annotations


def register() -> None:
    """The entry point: `adapter.register` (inert unless MOECAP_TRACE_DIR is set)."""
    from .adapter import register as _register

    _register()
