"""Top-k accuracy at view level and at video level (softmax averaged over a video's K x C views).

Evaluation views of one video may land on different workers and in different batches, so the
per-view probabilities are gathered by video id before averaging; ``VideoAccumulator`` keeps them as
sums and counts that merge across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top-k scores, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.unsqueeze(1))
    return {k: int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


@dataclass
class VideoAccumulator:
    """Sums softmax probabilities per video id across views (and ranks)."""

    prob_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    view_hits: dict[int, int] = field(default_factory=lambda: {1: 0, 5: 0})
    view_count: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, video_ids: Iterable[str]) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        for k, n in topk_correct(logits, labels).items():
            self.view_hits[k] = self.view_hits.get(k, 0) + n
        self.view_count += len(labels)
        probs = logits.softmax(dim=1)
        for vid, p, y in zip(video_ids, probs, labels.tolist()):
            if vid in self.prob_sum:
                self.prob_sum[vid] += p
                self.views[vid] += 1
                if self.labels[vid] != y:
                    raise ValueError(f"video {vid!r} has views with different labels ({self.labels[vid]} vs {y})")
            else:
                self.prob_sum[vid], self.views[vid], self.labels[vid] = p.clone(), 1, y

    def merge(self, other: "VideoAccumulator") -> None:
        for vid, p in other.prob_sum.items():
            if vid in self.prob_sum:
                self.prob_sum[vid] += p
                self.views[vid] += other.views[vid]
            else:
                self.prob_sum[vid], self.views[vid], self.labels[vid] = p.clone(), other.views[vid], other.labels[vid]
        for k, n in other.view_hits.items():
            self.view_hits[k] = self.view_hits.get(k, 0) + n
        self.view_count += other.view_count

    def metrics(self) -> dict[str, float]:
        if not self.prob_sum:
            return {}
        ids = sorted(self.prob_sum)
        probs = torch.stack([self.prob_sum[v] / self.views[v] for v in ids])
        labels = torch.tensor([self.labels[v] for v in ids])
        video_hits = topk_correct(probs, labels)
        out = {f"video_top{k}": 100.0 * n / len(ids) for k, n in video_hits.items()}
        out.update({f"view_top{k}": 100.0 * n / self.view_count for k, n in self.view_hits.items()})
        out["videos"] = float(len(ids))
        out["views"] = float(self.view_count)
        return out


def video_report(acc: VideoAccumulator, classes: Sequence[str], top: int = 5) -> dict:
    """What an evaluation tells beyond top-k, at video level (softmax averaged over each video's views):
    accuracy per class, the confusion matrix (rows: true class, columns: predicted top-1) and each video's
    top predictions, as plain values for a JSON report."""
    ids = sorted(acc.prob_sum)
    n = len(classes)
    confusion = [[0] * n for _ in range(n)]
    predictions = []
    if ids:
        probs = torch.stack([acc.prob_sum[v] / acc.views[v] for v in ids])
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        for vid, vals, idx in zip(ids, values.tolist(), indices.tolist()):
            label = acc.labels[vid]
            confusion[label][idx[0]] += 1
            predictions.append({"video_id": vid, "label": label, "views": acc.views[vid],
                                "top": [[i, round(p, 6)] for i, p in zip(idx, vals)]})
    per_class = []
    for c, name in enumerate(classes):
        videos = sum(confusion[c])
        per_class.append({"index": c, "class": name, "videos": videos,
                          "top1": 100.0 * confusion[c][c] / videos if videos else None})
    return {"per_class": per_class, "confusion": confusion, "predictions": predictions}
