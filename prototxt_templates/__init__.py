"""Caffe solver/net prototxt templates (Jinja2), shipped as ``lymph_cv.prototxt_templates``."""
