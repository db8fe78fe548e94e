"""After stage two: measure a student on held-out data and ship it.

metrics (accuracy, agreement with the teacher, calibration, the teacher's own numbers from the
test cache), results (reading the metrics files back), export (TorchScript and ONNX).

May import: pipeline.core, pipeline.data, pipeline.models, pipeline.cache, pipeline.student.
"""
