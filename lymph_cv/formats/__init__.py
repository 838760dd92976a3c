"""File formats: Caffe's protobufs and prototxt, LevelDB/LMDB stores, flags and logs."""
