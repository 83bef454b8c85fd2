"""secondstage serving: an OpenAI-compatible API over vLLM's in-process engine.

The package holds the HTTP app (`serve.app.build_app`), the engine wrapper, the
Redis log writer, the policy seam and the hot-swap watcher. Run it with
`secondstage serve`.
"""
