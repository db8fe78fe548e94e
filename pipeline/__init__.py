"""kd-pipeline: run the teacher once, distil many students from its cached logits."""

__version__ = "0.1.0"
