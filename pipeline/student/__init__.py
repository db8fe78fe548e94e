"""Stage two: train students against the cached targets, at any temperature, without the teacher.

targets (read a cache by sample id: dense, top-k or sampled rows, views, ensembles), losses
(the logit losses, one registry) and feature_losses, feature_training (the student side of
feature targets), students (the student directory and its config), distill (one student, or a
sweep in one process), sweep (the students × losses × temperatures matrix), livelog (dvclive).

May import: pipeline.core, pipeline.data, pipeline.models, pipeline.cache. Never
pipeline.teacher: the cache is the whole contract between the stages.
"""
