"""moe/metrics/heatmap.py: the expert-load image is bounded in size and renders."""
import numpy as np

from moe.metrics.heatmap import LoadHeatmap


def test_heatmap_is_bounded_and_renders():
    h = LoadHeatmap(max_columns=8)
    for step in range(1, 21):
        h.add({"step": step, "router/layer0/load": [0.7, 0.1, 0.1, 0.1], "router/layer2/load": [0.25] * 4,
               "loss/train": 1.0})
        assert len(h) <= 8
    h.add({"step": 21, "loss/val": 2.0})  # lines without loads are ignored
    assert len(h) <= 8 and h.steps[-1] >= 19
    image = h.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert LoadHeatmap().render() is None


def test_domain_heatmap_keeps_the_latest_matrices_and_renders():
    h = LoadHeatmap()
    assert h.render_domain() is None
    h.add({"step": 5, "router/layer1/domain": [[0.5, 0.5], [0.1, 0.9]], "router/domain_sources": ["code", "docs"]})
    h.add({"step": 10, "router/layer1/domain": [[0.9, 0.1], [0.2, 0.8]], "router/domain_sources": ["code", "docs"]})
    h.add({"step": 10, "loss/val": 2.0})
    assert h.domain == {1: [[0.9, 0.1], [0.2, 0.8]]} and h.domain_sources == ["code", "docs"]
    image = h.render_domain()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] > 100
