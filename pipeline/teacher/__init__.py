"""Stage one: run the teacher (or an ensemble) once over the transfer set and write the cache.

teachers (the forms a teacher comes in: checkpoint, TorchScript, ONNX, factory), precompute
(batches, shards, resume, torchrun; writes through pipeline.cache), features (forward hooks and
input gradients for feature targets), spotcheck (`verify --spot-check`: re-run the teacher on a
few rows and compare with the cache).

May import: pipeline.core, pipeline.data, pipeline.models, pipeline.cache. Never the student,
evaluate or report packages: editing a loss must not re-run the teacher.
"""
