"""Caffe job script templates (Jinja2), shipped as ``lymph_cv.job_templates``."""
