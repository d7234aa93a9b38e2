"""Weighted aggregation and payload checks (FIBECFED.md section 4)."""
from collections import OrderedDict

import pytest
import torch

from fedml_fibec.algorithm.aggregate import PayloadError, check_payload, payload_bytes, weighted_average


def test_weighted_average_hand_computed():
    a = OrderedDict(x=torch.tensor([1.0, 2.0]), y=torch.tensor([[0.0]]))
    b = OrderedDict(y=torch.tensor([[4.0]]), x=torch.tensor([3.0, -2.0]))
    out = weighted_average([(a, 1), (b, 3)])
    assert list(out) == ["x", "y"]
    assert torch.allclose(out["x"], torch.tensor([(1 + 9) / 4, (2 - 6) / 4]))
    assert torch.allclose(out["y"], torch.tensor([[3.0]]))


def test_weighted_average_dtypes():
    a = {"h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"h": torch.tensor([2.0, 4.0], dtype=torch.bfloat16)}
    out = weighted_average([(a, 1.0), (b, 1.0)])
    assert out["h"].dtype == torch.bfloat16 and out["h"].tolist() == [1.5, 3.0]
    d = {"h": torch.tensor([1.0, 1e-12], dtype=torch.float64)}
    e = {"h": torch.tensor([0.0, 0.0], dtype=torch.float64)}
    out = weighted_average([(d, 1.0), (e, 2.0)])
    assert out["h"].dtype == torch.float64 and out["h"][1].item() == pytest.approx(1e-12 / 3, rel=1e-15)


def test_weighted_average_single_payload_is_itself():
    p = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    assert torch.allclose(weighted_average([(p, 7)])["w"], p["w"], rtol=1e-6, atol=0)


def test_weighted_average_rejects_mismatch():
    with pytest.raises(PayloadError, match="unexpected"):
        weighted_average([({"x": torch.ones(2)}, 1), ({"x": torch.ones(2), "z": torch.ones(1)}, 1)])
    with pytest.raises(PayloadError, match="shape"):
        weighted_average([({"x": torch.ones(2)}, 1), ({"x": torch.ones(3)}, 1)])
    with pytest.raises(PayloadError):
        weighted_average([])
    with pytest.raises(PayloadError, match="weights"):
        weighted_average([({"x": torch.ones(2)}, 0)])


EXPECTED = {"a": ((2, 3), torch.float32), "b": ((4,), torch.float32), "c": ((1,), torch.float32)}


def good():
    return {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}


def test_check_payload_accepts_good():
    check_payload(good(), EXPECTED, device_id=3)


@pytest.mark.parametrize("mutate,words", [
    (lambda p: p.pop("b"), ["missing", "b"]),
    (lambda p: p.update(extra=torch.zeros(1)), ["unexpected", "extra"]),
    (lambda p: p.update(a=torch.zeros(3, 2)), ["shape", "a"]),
    (lambda p: p.update(c=torch.zeros(1, dtype=torch.float16)), ["dtype", "c"]),
    (lambda p: p["b"].__setitem__(2, float("nan")), ["non-finite", "b"]),
    (lambda p: p["a"].__setitem__((0, 0), float("inf")), ["non-finite", "a"]),
])
def test_check_payload_rejects_with_device_and_keys(mutate, words):
    payload = good()
    mutate(payload)
    with pytest.raises(PayloadError) as err:
        check_payload(payload, EXPECTED, device_id=37)
    msg = str(err.value)
    assert "device 37" in msg
    for w in words:
        assert w in msg


def test_check_payload_nan_allowed_when_not_checked_and_truncates_long_lists():
    payload = good()
    payload["b"][0] = float("nan")
    check_payload(payload, EXPECTED, device_id=1, check_finite=False)
    many = {f"k{i:02d}": ((1,), torch.float32) for i in range(12)}
    with pytest.raises(PayloadError) as err:
        check_payload({}, many, device_id="dev-9")
    msg = str(err.value)
    assert "dev-9" in msg and "k00" in msg and "+7 more" in msg and "k11" not in msg


def test_payload_bytes():
    p = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16), "c": torch.zeros(5, dtype=torch.int64)}
    assert payload_bytes(p) == 24 + 8 + 40


def test_row_sparse_upload_rebuilds_the_whole_tensor_bit_exactly_in_every_wire_dtype():
    """The rows a device did not send are the downloaded ones: rebuilt, the upload equals the dense one."""
    from fedml_fibec.core.messages import Upload, select_rows

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sent = {"a": torch.randn(6, 4, generator=g).to(dtype), "head": torch.randn(2, 4, generator=g).to(dtype)}
        trained = {k: v.clone() for k, v in sent.items()}
        mask = torch.tensor([True, False, False, True, False, False])
        trained["a"][mask] += 1
        trained["head"] += 1
        tensors, rows = select_rows(trained, {"a": mask})
        assert rows["a"].tolist() == [0, 3] and tensors["a"].shape == (2, 4) and tensors["head"] is trained["head"]
        up = Upload(1, 10, tensors, rows=rows)
        dense = up.dense_tensors(sent)
        assert all(torch.equal(dense[k], trained[k]) and dense[k].dtype == dtype for k in trained)
        assert up.nbytes == 2 * 4 * dtype.itemsize + 2 * 4 * dtype.itemsize + 2 * 4  # rows as int32
        assert select_rows(trained, {"a": torch.ones(6, dtype=torch.bool)})[1] == {}  # every row: dense


def test_check_rows_names_the_device_and_key():
    from fedml_fibec.algorithm import PayloadError, check_rows

    shapes = {"a": (6, 4)}
    check_rows({"a": torch.tensor([0, 5])}, shapes, device_id=3)
    for rows, reason in (({"b": torch.tensor([0])}, "not one of the expected keys"),
                         ({"a": torch.tensor([0.0])}, "expected a 1-D integer tensor"),
                         ({"a": torch.tensor([[0]])}, "expected a 1-D integer tensor"),
                         ({"a": torch.tensor([0, 6])}, r"row indices must be in \[0, 6\)"),
                         ({"a": torch.tensor([-1])}, r"row indices must be in \[0, 6\)"),
                         ({"a": torch.tensor([3, 3])}, "row indices must be distinct and ascending")):
        with pytest.raises(PayloadError, match=f"device 3 rejected: rows of '.*': {reason}"):
            check_rows(rows, shapes, device_id=3)
