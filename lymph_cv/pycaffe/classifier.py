"""``caffe.Classifier``: oversampled prediction of H×W×K images with a deploy net."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from lymph_cv.errors import ConfigError
from lymph_cv.pycaffe import io
from lymph_cv.pycaffe.net import TEST, Net

#: Images in [0, 1] (load_image) become H×W×K; the net wants K×H×W.
HWC_TO_CHW = (2, 0, 1)


class Classifier(Net):
    """A TEST-phase Net with a Transformer on its first input (pycaffe's Classifier).

    ``predict(images, oversample=True)`` resizes each image to ``image_dims``, takes the ten
    :func:`~lymph_cv.pycaffe.io.oversample` crops (or the centre crop), preprocesses them, runs
    them in net-sized batches and returns the first output averaged over each image's crops.
    """

    def __init__(self, model_file: str | os.PathLike, pretrained_file: str | os.PathLike,
                 image_dims: Optional[Sequence[int]] = None, mean: Optional[np.ndarray] = None,
                 input_scale: Optional[float] = None, raw_scale: Optional[float] = None,
                 channel_swap: Optional[Sequence[int]] = None):
        super().__init__(model_file, pretrained_file, TEST)
        name = self.inputs[0]
        shape = self.blobs[name].shape
        if len(shape) != 4:
            raise ConfigError(f"Classifier needs a 4-D input blob, {name!r} is {shape}")
        self.transformer = io.Transformer({name: shape})
        self.transformer.set_transpose(name, HWC_TO_CHW)
        if mean is not None:
            self.transformer.set_mean(name, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(name, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(name, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(name, channel_swap)
        self.crop_dims = np.array(shape[2:])
        self.image_dims = np.array(image_dims if image_dims is not None else self.crop_dims)

    def _centre_crops(self, images: np.ndarray) -> np.ndarray:
        top = (self.image_dims / 2.0 - self.crop_dims / 2.0).astype(int)
        bottom = (self.image_dims / 2.0 + self.crop_dims / 2.0).astype(int)
        return images[:, top[0]:bottom[0], top[1]:bottom[1], :]

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores (first output blob) per input image: N×classes."""
        if not len(inputs):
            raise ConfigError("predict needs at least one image")
        channels = np.asarray(inputs[0]).shape[2]
        resized = np.zeros((len(inputs), int(self.image_dims[0]), int(self.image_dims[1]), channels),
                           dtype=np.float32)
        for index, image in enumerate(inputs):
            resized[index] = io.resize_image(image, self.image_dims)
        crops = io.oversample(resized, self.crop_dims) if oversample else self._centre_crops(resized)
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, crop) for crop in crops])
        scores = self.forward_all(**{name: batch})[self.outputs[0]]
        scores = scores.reshape(len(scores), -1)
        if oversample:
            scores = scores.reshape(len(inputs), io.OVERSAMPLE_CROPS, -1).mean(axis=1)
        return scores
