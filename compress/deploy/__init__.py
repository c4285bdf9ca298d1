"""Stages 2–4 — deploy: extract the zero structures, export verified ONNX, benchmark, save compressed models."""
