"""The PyTorch port of Caffe nets: a layer registry (type → builder) and the prototxt → module builder."""
