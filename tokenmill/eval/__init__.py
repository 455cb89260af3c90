"""Quality evaluations that run through the engine (``tokenmill eval ...``)."""

from tokenmill.eval.ppl import (
    PerplexityResult,
    Window,
    bundled_text_path,
    load_text,
    make_windows,
    parse_overrides,
    perplexity,
    score_windows,
)

__all__ = [
    "PerplexityResult",
    "Window",
    "bundled_text_path",
    "load_text",
    "make_windows",
    "parse_overrides",
    "perplexity",
    "score_windows",
]
