"""quantize-all's orchestration: the zoo file, the plan, Ray tasks, the output store, the CLI.

Depends on ``quantizer`` (never the other way round). Ray lives in ``jobs.task`` and
``jobs.driver`` only; click in ``jobs.cli`` only.
"""
