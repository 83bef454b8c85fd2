"""The demo model: a tiny Llama chat model the project builds offline from its own text.

`ensure_demo_model(dir)` builds it once; `build_demo_model(dir)` rebuilds it. See `serve.demo.build`.
"""

from serve.demo.build import build_demo_model, demo_dialogues, ensure_demo_model

__all__ = ["build_demo_model", "demo_dialogues", "ensure_demo_model"]
