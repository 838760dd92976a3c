"""lymph_cv.pycaffe: Net, Classifier and io behave like pycaffe."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import lymph_cv.pycaffe as caffe
from lymph_cv.errors import ConfigError, InputError
from netutil import CLASSES, rendered


@pytest.fixture
def deploy(tmp_path):
    return rendered(tmp_path / "work").deploy


def _bilinear_reference(image, height, width):
    """scikit-image's order-1 resize: src = (dst + 0.5)·in/out − 0.5, edges repeated."""
    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    rl, rh, rf = axis_weights(image.shape[0], height)
    cl, ch, cf = axis_weights(image.shape[1], width)
    rows = image[rl] * (1 - rf)[:, None, None] + image[rh] * rf[:, None, None]
    return rows[:, cl] * (1 - cf)[None, :, None] + rows[:, ch] * cf[None, :, None]


def test_oversample_crop_order():
    image = np.arange(6 * 7 * 2, dtype=np.float32).reshape(6, 7, 2)
    crops = caffe.io.oversample([image], (4, 4))
    assert crops.shape == (10, 4, 4, 2)
    starts = [(0, 0), (0, 3), (2, 0), (2, 3), (1, 1)]  # corners row-major, then int(6/2-2), int(7/2-2)
    for index, (h, w) in enumerate(starts):
        window = image[h:h + 4, w:w + 4]
        np.testing.assert_array_equal(crops[index], window)
        np.testing.assert_array_equal(crops[index + 5], window[:, ::-1])


def test_resize_image_is_half_pixel_bilinear():
    rng = np.random.default_rng(0)
    mean = rng.uniform(80, 160, size=(36, 36, 3)).astype(np.float32)
    np.testing.assert_allclose(caffe.io.resize_image(mean, (32, 32)), _bilinear_reference(mean, 32, 32),
                               rtol=1e-5)
    small = rng.random((5, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(caffe.io.resize_image(small, (9, 7)), _bilinear_reference(small, 9, 7), rtol=1e-5)
    flat = np.full((4, 4, 3), 0.25, np.float32)
    assert np.all(caffe.io.resize_image(flat, (9, 9)) == 0.25)
    assert caffe.io.resize_image(rng.random((4, 4, 5)), (8, 8)).shape == (8, 8, 5)


def test_load_image_rgb_float(tmp_path):
    bgr = np.zeros((5, 6, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "b.png"), bgr)
    image = caffe.io.load_image(str(tmp_path / "b.png"))
    assert image.dtype == np.float32 and image.shape == (5, 6, 3)
    assert np.all(image[..., 2] == 1.0) and np.all(image[..., :2] == 0.0)
    cv2.imwrite(str(tmp_path / "g.png"), np.full((3, 3), 51, np.uint8))
    assert np.allclose(caffe.io.load_image(str(tmp_path / "g.png")), 0.2)
    assert caffe.io.load_image(str(tmp_path / "g.png"), color=False).shape == (3, 3, 1)
    with pytest.raises(InputError, match="cannot read image"):
        caffe.io.load_image(str(tmp_path / "missing.tif"))


def test_transformer_order_and_mean_resize():
    t = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    mean = np.random.default_rng(0).uniform(0, 255, size=(3, 36, 36)).astype(np.float32)
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    resized_mean = caffe.io.resize_image(mean.transpose(1, 2, 0), (32, 32)).transpose(2, 0, 1)
    np.testing.assert_allclose(t.mean["data"], resized_mean)
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    out = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[::-1] * 255 - resized_mean) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", out), image, atol=1e-5)
    with pytest.raises(ConfigError, match="not a net input"):
        t.set_raw_scale("label", 1)
    with pytest.raises(ConfigError, match="mean has 2 channels"):
        t.set_mean("data", np.zeros(2))


def test_blob_and_datum_helpers():
    blob = caffe.io.caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    blob.data.extend(range(6))
    assert caffe.io.blobproto_to_array(blob).shape == (1, 2, 1, 3)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = caffe.io.blobproto_to_array(caffe.io.array_to_blobproto(array, diff=-array), return_diff=True)
    np.testing.assert_array_equal(back, -array)
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = caffe.io.array_to_datum(pixels, 2)
    assert datum.label == 2 and datum.data == pixels.tobytes()
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), pixels)
    assert not caffe.io.array_to_datum(pixels.astype(np.float32)).HasField("label")


def test_net_blobs_params_forward_and_save_reload(deploy, tmp_path):
    caffe.set_mode_cpu()
    caffe.set_random_seed(5)
    net = caffe.Net(str(deploy), caffe.TEST)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net.params) == ["conv1", "conv2", "conv3", "ip1", "ip2"]
    assert net.params["ip1"][0].data.shape == (64, 1024) and net.blobs["data"].data.shape == (10, 3, 32, 32)
    rng = np.random.default_rng(0)
    net.params["conv1"][0].data[...] = rng.normal(0, 0.05, size=(32, 3, 5, 5))  # a view: writes go through
    assert np.array_equal(net.torch_net.layer("conv1").blobs[0].detach().numpy(), net.params["conv1"][0].data)
    net.blobs["data"].data[...] = rng.normal(0, 40, size=(10, 3, 32, 32))
    out = net.forward()
    assert out["prob"].shape == (10, CLASSES) and np.allclose(out["prob"].sum(axis=1), 1, atol=1e-6)
    assert out["prob"] is net.blobs["prob"].data
    saved = tmp_path / "saved.caffemodel"
    net.save(str(saved))
    for again in (caffe.Net(str(deploy), str(saved), caffe.TEST),
                  caffe.Net(str(deploy), caffe.TEST, weights=str(saved))):
        for name in net.params:
            for a, b in zip(net.params[name], again.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(again.forward(data=net.blobs["data"].data)["prob"], out["prob"])
    with pytest.raises(ConfigError, match="batch of 3"):
        net.forward(data=np.zeros((3, 3, 32, 32)))
    with pytest.raises(ConfigError, match="Net needs a phase"):
        caffe.Net(str(deploy))
    expected = out["prob"].copy()  # as in Caffe, the returned arrays are the blobs: the next forward overwrites them
    all_out = net.forward_all(data=np.repeat(net.blobs["data"].data, 2, axis=0)[:13])
    assert all_out["prob"].shape == (13, CLASSES)
    np.testing.assert_allclose(all_out["prob"][:5], expected[[0, 0, 1, 1, 2]], atol=1e-6)


def test_classifier_averages_ten_crops(deploy, tmp_path):
    caffe.set_random_seed(1)
    weights = tmp_path / "w.caffemodel"
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(2)
    for blobs in net.params.values():
        blobs[0].data[...] = rng.normal(0, 0.05, size=blobs[0].data.shape)
    net.save(str(weights))
    mean = rng.uniform(90, 150, size=(3, 36, 36)).astype(np.float32)
    clf = caffe.Classifier(str(deploy), str(weights), mean=mean, channel_swap=(2, 1, 0), raw_scale=255,
                           image_dims=(36, 36))
    images = [rng.random((36, 36, 3)).astype(np.float32) for _ in range(3)]
    scores = clf.predict(images)
    assert scores.shape == (3, CLASSES)
    crops = caffe.io.oversample(images, (32, 32))
    batch = np.stack([clf.transformer.preprocess("data", crop) for crop in crops])
    probs = np.concatenate([net.forward(data=batch[i:i + 10])["prob"].copy() for i in (0, 10, 20)])
    np.testing.assert_allclose(scores, probs.reshape(3, 10, CLASSES).mean(axis=1), atol=1e-6)
    centre = clf.predict(images, oversample=False)
    np.testing.assert_allclose(centre, probs[4::10], atol=1e-6)  # crop 4 of each image is the centre


def test_tutorial_step5_flow_runs_with_only_the_import_changed(tmp_path, reference):
    """The tutorial's step-5 loop, ported to Python 3, on a synthetic image with fold 1's model."""
    image_path = tmp_path / "images" / "CLL" / "case_001.tif"
    image_path.parent.mkdir(parents=True)
    rng = np.random.default_rng(3)
    cv2.imwrite(str(image_path), rng.integers(60, 230, size=(100, 132, 3)).astype(np.uint8))
    models = rendered(tmp_path / "work").deploy
    a = caffe.io.caffe_pb2.BlobProto()
    with open(reference / "DB_train_w32_1.binaryproto", "rb") as file:
        a.ParseFromString(file.read())
    means = np.asarray(a.data).reshape(3, 36, 36)
    caffe.set_mode_gpu()
    net = caffe.Classifier(str(models), str(reference / "1_caffenet_train_w32_iter_600000.caffemodel"),
                           mean=means, channel_swap=(2, 1, 0), raw_scale=255, image_dims=(36, 36))
    wsize, stride = 36, 32
    hwsize = wsize // 2
    image = caffe.io.load_image(str(image_path))
    counts = [0, 0, 0]
    for rowi in range(hwsize + 1, image.shape[0] - hwsize, stride):
        for coli in range(hwsize + 1, image.shape[1] - hwsize, stride):
            patch = image[rowi - hwsize:rowi + hwsize, coli - hwsize:coli + hwsize, :]
            prediction = net.predict([patch])
            assert prediction.shape == (1, CLASSES) and prediction.sum() == pytest.approx(1, abs=1e-5)
            counts[prediction[0].argmax()] += 1
    assert sum(counts) == 2 * 3  # rows 19, 51; columns 19, 51, 83


def test_net_with_data_layers_reads_batches_in_order(tmp_path):
    from trainutil import CLASSES as TINY_CLASSES
    from trainutil import CROP, make_dataset, make_fold

    make_dataset(tmp_path, n_train=20, n_test=20)
    net_file = make_fold(tmp_path, batch=8).parent / "1-net.prototxt"
    net = caffe.Net(str(net_file), caffe.TEST)
    assert net.inputs == [] and net.outputs == ["accuracy", "loss"]  # Caffe: Data layer tops are no inputs
    first = net.forward()
    data_1, labels_1 = net.blobs["data"].data.copy(), net.blobs["label"].data.copy()
    assert data_1.shape == (8, 3, CROP, CROP) and set(labels_1) <= set(range(TINY_CLASSES))
    assert 0.0 <= float(first["accuracy"]) <= 1.0 and float(first["loss"]) > 0
    net.forward()
    assert not np.array_equal(net.blobs["data"].data, data_1)  # the next 8 records, not the same batch
