"""The demo model: a tiny Llama chat model the project builds offline from its own text.

`ensure_demo_model(dir)` builds it once; `build_demo_model(dir)` rebuilds it. See `serve.demo.build`, and
`DemoModelSpec` for the sizes (tests build smaller models by passing another spec).
"""

from serve.demo.build import build_demo_model, ensure_demo_model
from serve.demo.dialogues import demo_dialogues
from serve.demo.spec import DemoModelSpec

__all__ = ["DemoModelSpec", "build_demo_model", "demo_dialogues", "ensure_demo_model"]
