"""Caffe's file formats: the schema, blobs, datums, models, prototxt."""
