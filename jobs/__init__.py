"""quantize-all's orchestration: the zoo file, the plan, Ray tasks, the output store, the CLI.

Depends on ``quantizer`` (never the other way round). Ray lives in ``jobs.task`` (the remote
functions) and ``jobs.fanout`` (the driver's side) only; click in ``jobs.cli`` only; torch in
``jobs.convert`` and ``jobs.measure`` (the task's work) only, so planning and a no-op refresh
never import it.
"""
