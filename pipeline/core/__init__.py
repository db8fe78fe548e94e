"""Shared ground: what every stage needs and nothing stage-specific.

errors (PipelineError, the one-line failures), fsutil (atomic writes, locks), config (the
typed params.yaml sections), device and distributed (where and on how many ranks to compute),
training (the one training loop, for the teacher and the students), progress, usercode
(`package.module:function` references), runrecord (run times beside artifacts).

May import: pipeline.core, pipeline.models (config checks model names). Never the
stages' packages.
"""
