"""The report: one markdown page and its plots from the evaluated students.

report (tables, ranking, ties), figures (matplotlib plots; also `show-targets`).

May import: pipeline.core, pipeline.data, pipeline.models, pipeline.cache, pipeline.student,
pipeline.evaluate. Nothing imports it but the CLI: editing it re-runs only the report.
"""
