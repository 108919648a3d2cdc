"""Coverage: which layers a run quantized, which it skipped, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str
    kind: str  # module class name
    status: str  # "quantized" or "skipped"
    reason: str = ""
    in_block: bool = False
    format: str = ""
    bits_per_weight: float | None = None
    numel: int = 0
    method: str = ""
    act: str = ""  # integer activation format, if any


@dataclass
class Coverage:
    layers: list[LayerRecord] = field(default_factory=list)

    def add(self, record: LayerRecord) -> None:
        self.layers.append(record)

    def get(self, name: str) -> LayerRecord | None:
        return next((r for r in self.layers if r.name == name), None)

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "quantized"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "skipped"]

    def block_counts(self) -> tuple[int, int]:
        """(quantized, total) among the linears inside the model's repeated blocks."""
        inside = [r for r in self.layers if r.in_block]
        return sum(r.status == "quantized" for r in inside), len(inside)

    def mean_bits_per_weight(self) -> float | None:
        q = [r for r in self.quantized if r.bits_per_weight is not None]
        total = sum(r.numel for r in q)
        if not total:
            return None
        return sum(r.bits_per_weight * r.numel for r in q) / total

    def summary(self) -> str:
        done, total = self.block_counts()
        lines = [f"quantized {len(self.quantized)} layers ({done} of {total} block linears)"]
        for r in self.skipped:
            lines.append(f"  skipped {r.name} ({r.kind}): {r.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        done, total = self.block_counts()
        return {
            "quantized": len(self.quantized),
            "skipped": len(self.skipped),
            "block_linears_quantized": done,
            "block_linears_total": total,
            "layers": [asdict(r) for r in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Coverage:
        return cls([LayerRecord(**r) for r in d.get("layers", [])])
