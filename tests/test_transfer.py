"""The step's one host-to-device copy: packing arrays into one buffer and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine.transfer import DeviceToHost, HostToDevice, pack, unpack


def test_pack_and_unpack_round_trip_every_dtype_and_shape():
    arrays = {
        "ids": np.array([3, -1, 2**40], dtype=np.int64),
        "table": np.arange(12, dtype=np.int64).reshape(3, 4),
        "params": np.array([[0.8, 0.0, 0.95, 1e-300]], dtype=np.float64),
        "empty": np.zeros((0, 2), dtype=np.int64),
    }
    buffer = np.zeros(64, dtype=np.int64)
    used = pack(arrays, buffer)
    assert used == 3 + 12 + 4
    views = unpack(torch.from_numpy(buffer[:used]), arrays)
    for name, a in arrays.items():
        assert views[name].dtype == torch.from_numpy(a).dtype
        assert views[name].shape == a.shape
        np.testing.assert_array_equal(views[name].numpy(), a)


def test_only_int64_and_float64_travel():
    with pytest.raises(TypeError, match="int32"):
        HostToDevice(torch.device("cpu")).to_device({"x": np.zeros(2, dtype=np.int32)})


def test_results_come_back_in_one_copy_exact_for_ids():
    tokens = torch.tensor([5, 2**52 + 1])
    scores = torch.tensor([[0.5, -1.25]], dtype=torch.float32)
    flags = torch.tensor([True, False])
    out = DeviceToHost().start([tokens, scores, flags]).wait()
    assert out[0].astype(np.int64).tolist() == [5, 2**52 + 1]
    assert out[1].tolist() == [[0.5, -1.25]]
    assert out[2].tolist() == [1.0, 0.0]
