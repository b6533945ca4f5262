"""The expert load of every MoE layer over the run, as one image for W&B."""
from __future__ import annotations

import re
from typing import Any, Dict, List


class LoadHeatmap:
    """Per-layer expert load over time, rendered as one image for W&B (a heatmap per MoE layer:
    steps across, experts down, colour = load / uniform load).

    Fed with every logged record; bounded memory (at most `max_columns` time columns: when full,
    neighbouring columns are averaged pairwise, so the image always spans the whole run) and bounded
    cost (the caller renders it only on evaluation lines)."""

    _KEY = re.compile(r"^router/layer(\d+)/load$")

    _DOMAIN = re.compile(r"^router/layer(\d+)/domain$")

    def __init__(self, max_columns: int = 256) -> None:
        self.max_columns = max_columns
        self.steps: List[int] = []
        self.loads: Dict[int, List[List[float]]] = {}
        self.domain: Dict[int, Any] = {}
        """A data mixture's latest routing-by-domain matrices {layer: sources x experts} (`render_domain`)."""
        self.domain_sources: List[str] = []

    def add(self, record: Dict[str, Any]) -> None:
        domain = {int(m.group(1)): v for k, v in record.items() if (m := self._DOMAIN.match(k))}
        if domain:
            self.domain, self.domain_sources = domain, list(record.get("router/domain_sources", []))
        found = {int(m.group(1)): v for k, v in record.items() if (m := self._KEY.match(k))}
        if not found:
            return
        if set(found) != set(self.loads) and self.steps:  # a layer set change cannot happen within a run
            self.steps, self.loads = [], {}
        self.steps.append(int(record["step"]))
        for layer, load in found.items():
            self.loads.setdefault(layer, []).append(list(load))
        if len(self.steps) > self.max_columns:
            self.steps = self.steps[1::2]
            for layer, cols in self.loads.items():
                pairs = zip(cols[0::2], cols[1::2])
                self.loads[layer] = [[(a + b) / 2 for a, b in zip(x, y)] for x, y in pairs]

    def __len__(self) -> int:
        return len(self.steps)

    def render(self):
        """An RGB uint8 array [H, W, 3] of the heatmaps (None when nothing was logged)."""
        if not self.steps:
            return None
        import matplotlib  # deferred: only W&B runs render it, and it costs start-up time

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        layers = sorted(self.loads)
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.1 * len(layers)), squeeze=False,
                                 sharex=True)
        for ax, layer in zip(axes[:, 0], layers):
            grid = np.asarray(self.loads[layer], dtype=float).T  # [E, time]
            grid = grid * grid.shape[0]  # 1 = uniform load
            im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                           extent=(self.steps[0], self.steps[-1], grid.shape[0] - 0.5, -0.5))
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="load / uniform")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per MoE layer")
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return image

    def render_domain(self):
        """An RGB uint8 array of the latest routing-by-domain matrices (sources down, experts across,
        colour = share of the source's routed tokens), one panel per MoE layer; None before any."""
        if not self.domain:
            return None
        import matplotlib  # deferred, as in render

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        layers = sorted(self.domain)
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.0 + 1.2 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            grid = np.asarray(self.domain[layer], dtype=float)
            im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
            if len(self.domain_sources) == grid.shape[0]:
                ax.set_yticks(range(grid.shape[0]), labels=self.domain_sources)
            ax.set_ylabel(f"layer {layer}")
            fig.colorbar(im, ax=ax, label="share")
        axes[-1, 0].set_xlabel("expert")
        fig.suptitle("routing by domain per MoE layer")
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return image
