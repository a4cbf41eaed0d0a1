"""``k2 serve``: an OpenAI-compatible chat server over the rollout engine (docs/serve.md).

:mod:`k2.serve.schemas` validates requests and builds OpenAI-format responses,
:mod:`k2.serve.scheduler` owns the engine in one thread and batches concurrent requests,
:mod:`k2.serve.app` is the Starlette application (needs the ``serve`` extra).
"""
