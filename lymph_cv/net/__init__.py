"""The PyTorch port of Caffe nets: a layer registry (type → builder) and the prototxt → module builder.

Nothing is imported here: ``lymph_cv.net.archs`` (used by ``render``) must not load torch.
"""
