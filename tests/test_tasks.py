"""Fast checks of the task benchmarks in tools/tasks.py and tools/ort_baseline.py."""
from __future__ import annotations

import numpy as np
import pytest

from tools import tasks
from tools.ort_baseline import quantize_with_ort


def _lev(a: str, b: str) -> int:  # textbook O(len(a)*len(b)) reference
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return d[-1]


def test_edit_distance():
    for a, b, d in [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0),
                    ("flaw", "lawn", 2), ("25°C", "25℃", 2), ("ab", "ba", 2)]:
        assert tasks.edit_distance(a, b) == d, (a, b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = ("".join(rng.choice(list("ab°c"), int(rng.integers(0, 9)))) for _ in range(2))
        assert tasks.edit_distance(a, b) == _lev(a, b), (a, b)


def _ctc_probs(strings, chars, T=24):
    """One-hot CTC outputs spelling `strings` (a blank after every symbol, so doubles survive)."""
    idx = {c: i for i, c in enumerate(chars)}
    p = np.zeros((len(strings), T, len(chars)), np.float32)
    p[:, :, 0] = 1
    for n, s in enumerate(strings):
        for t, c in enumerate(s):
            p[n, 2 * t, 0], p[n, 2 * t, idx[c]] = 0, 1
    return p


def test_rec_metrics():
    chars = tasks.rec_characters()
    assert chars[0] == "blank" and chars[-1] == " " and len(chars) == 6625
    probs = _ctc_probs(["hello", "w0rld", "a b"], chars)
    assert tasks.ctc_decode(probs, chars) == ["hello", "w0rld", "a b"]
    m = tasks.rec_metrics(probs, ["hello", "world", "ab"], chars)  # 1 substitution, space ignored
    assert m["char_acc"] == pytest.approx(1 - 1 / 12) and m["line_acc"] == pytest.approx(2 / 3)
    m = tasks.rec_metrics(probs, ["hello", "world", "ab"], chars, ignore_space=False)
    assert m["char_acc"] == pytest.approx(1 - 2 / 12)
    # repeats without a blank in between merge (CTC), and the score is clipped at 0
    p = np.zeros((1, 6, len(chars)), np.float32)
    p[0, :, chars.index("a")] = 1
    assert tasks.ctc_decode(p, chars) == ["a"]
    assert tasks.rec_metrics(_ctc_probs(["abcdefghij"], chars), ["x"], chars)["char_acc"] == 0.0


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(1)
    for _ in range(30):
        m = rng.random(tuple(rng.integers(1, 25, 2))) < rng.uniform(0.2, 0.7)
        seen, ref = np.zeros_like(m), []
        for y, x in zip(*np.nonzero(m)):
            if seen[y, x]:
                continue
            stack, pix = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pix.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < m.shape[0] and 0 <= nx < m.shape[1] and m[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            ys, xs = zip(*pix)
            ref.append((min(xs), min(ys), max(xs), max(ys), len(pix)))
        boxes, counts = tasks.label_components(m)
        got = sorted(tuple(int(v) for v in b) + (int(c),) for b, c in zip(boxes, counts))
        assert got == sorted(ref)


def test_match_boxes_greedy_one_to_one():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    pred = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 0, 26, 10], [50, 50, 60, 60]], np.float32)
    # pred0 takes gt0 (IoU 1), pred1 (IoU .9) finds it used; pred2 vs gt1 IoU .6 >= .5
    assert tasks.match_boxes(pred, gt) == 2
    assert tasks.match_boxes(pred, gt, 0.7) == 1
    assert tasks.match_boxes(pred[:0], gt) == 0


def test_det_metrics_on_hand_made_map():
    pm = np.zeros((1, 1, 200, 200), np.float32)
    pm[0, 0, 50:60, 50:150] = 0.9   # a text line, shrunk as DB predicts it
    pm[0, 0, 120:130, 20:60] = 0.35  # above 0.3 but mean score < 0.5: dropped like rapidocr
    pred = tasks.map_boxes(pm[0, 0])
    # dilated component spans x 50..150, y 50..60 (101 x 11); unclip d = 101*11*1.6/(2*112)
    d = 101 * 11 * 1.6 / 224
    np.testing.assert_allclose(pred, [[50 - d, 50 - d, 151 + d, 61 + d]], rtol=1e-6)
    gt = [np.array([[42, 42, 159, 69], [0, 170, 40, 190]], np.float32)]
    m = tasks.det_metrics(pm, gt)
    assert m["precision"] == 1.0 and m["recall"] == 0.5 and m["f1"] == pytest.approx(2 / 3)


def test_datasets_deterministic_and_disjoint():
    x1, t1 = tasks.rec_dataset(6, seed=3)
    x2, t2 = tasks.rec_dataset(6, seed=3)
    assert x1.shape == (6, 3, 48, 320) and x1.dtype == np.float32 and t1 == t2
    np.testing.assert_array_equal(x1, x2)
    assert tasks.rec_dataset(6, seed=4)[1] != t1
    assert all(c in tasks.rec_characters() for t in t1 for c in t)
    c1, l1 = tasks.cls_dataset(6, seed=3)
    np.testing.assert_array_equal(c1, tasks.cls_dataset(6, seed=3)[0])
    assert c1.shape == (6, 3, 48, 192) and list(l1) == [0, 1] * 3
    d1, b1 = tasks.det_dataset(1, seed=3)
    d2, b2 = tasks.det_dataset(1, seed=3)
    assert d1.shape == (1, 3, 640, 640)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(b1[0], b2[0])
    cal = tasks.calibration("rec", 6)
    assert set(cal) == {"x"} and not np.array_equal(cal["x"], tasks.rec_dataset(6)[0])
    assert tasks.calibration("zoo_resnet", 16)["input"].shape == (16, 3, 32, 32)


def test_float_cls_scores_high():
    assert tasks.evaluate(tasks.model_path("cls"), "cls", tasks.cls_dataset(40, seed=5))["acc"] >= 0.95


def test_ort_baseline(tmp_path):
    with pytest.raises(ValueError, match="no 3-bit"):
        quantize_with_ort(tasks.model_path("zoo_resnet"), {}, tmp_path / "q.onnx", 3, 8)
    with pytest.raises(ValueError, match="no 2-bit"):
        quantize_with_ort(tasks.model_path("zoo_resnet"), {}, tmp_path / "q.onnx", 8, 2)
    q = quantize_with_ort(tasks.model_path("zoo_resnet"), tasks.calibration("zoo_resnet", 32),
                          tmp_path / "q.onnx", 8, 8)
    data = tasks.zoo_dataset("zoo_resnet")
    data = (data[0][:500], data[1][:500])
    f = tasks.evaluate(tasks.model_path("zoo_resnet"), "zoo", data)["top1"]
    assert tasks.evaluate(q, "zoo", data)["top1"] >= f - 0.03


def test_pipeline_text_accuracy_counts_misses_and_extras():
    from tools.ocr_pipeline import text_accuracy

    gt_boxes = [np.array([[0, 0, 100, 20], [0, 40, 100, 60]], np.float32)]
    texts = [["hello world", "abc"]]  # 10 + 3 characters, spaces ignored
    exact = [[(np.array([1, 1, 99, 19], np.float32), "hello world"), (np.array([0, 41, 100, 61], np.float32), "abc")]]
    assert text_accuracy(exact, gt_boxes, texts) == {"char_acc": 1.0, "line_acc": 1.0}
    one_typo_one_missed = [[(np.array([1, 1, 99, 19], np.float32), "hellO world")]]
    assert text_accuracy(one_typo_one_missed, gt_boxes, texts)["char_acc"] == pytest.approx(1 - (1 + 3) / 13)
    extra = exact[0] + [(np.array([200, 200, 260, 220], np.float32), "noise")]
    assert text_accuracy([extra], gt_boxes, texts)["char_acc"] == pytest.approx(1 - 5 / 13)


def test_page_dataset_draws_det_dataset_pages_with_their_text():
    pages, boxes, texts = tasks.page_dataset(2, seed=5)
    x, det_boxes = tasks.det_dataset(2, seed=5)
    np.testing.assert_array_equal((pages.transpose(0, 3, 1, 2) / np.float32(255) - 0.5) / 0.5, x)
    assert all(len(b) == len(t) == len(d) for b, t, d in zip(boxes, texts, det_boxes))
    assert all(t.strip() and set(t) <= set(tasks.rec_characters()) for page in texts for t in page)


def test_detector_metrics_on_hand_made_boxes():
    from tools.detector import f1, map50

    gt = [np.array([[0, 10, 10, 50, 50], [1, 60, 60, 90, 90]], np.float32)]
    perfect = [np.array([[0, 0.9, 10, 10, 50, 50], [1, 0.8, 60, 60, 90, 90]], np.float32)]
    assert map50(perfect, gt) == pytest.approx(1.0)
    wrong_class = [np.array([[1, 0.9, 10, 10, 50, 50], [1, 0.8, 60, 60, 90, 90]], np.float32)]
    assert f1(wrong_class, perfect) == pytest.approx(0.5)  # one of two matches
    shifted = [np.array([[0, 0.9, 30, 30, 70, 70]], np.float32)]  # IoU 1/7 with the first box
    assert f1(shifted, perfect) == 0.0
    assert map50(wrong_class, gt) == pytest.approx(0.25)  # class 0 never found; class 1 at precision 1/2
