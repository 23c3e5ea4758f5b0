"""`Policy`: group name -> channels kept. The canonical, hardware-meaningful form of a pruning
decision; ratios exist only inside searchers. Keyed by group name, never by `nn.Module`."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Policy:
    """An immutable, hashable mapping of group name -> channels kept (a positive int)."""

    items: tuple[tuple[str, int], ...]

    def __post_init__(self):
        seen = set()
        for name, keep in self.items:
            if not isinstance(name, str) or not name:
                raise UserError(f"policy group names must be non-empty strings, got {name!r}")
            if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
                raise UserError(f"policy keeps must be positive integers (channels kept), got "
                                f"{keep!r} for group {name!r}")
            if name in seen:
                raise UserError(f"policy names group {name!r} twice; name each group once")
            seen.add(name)

    @classmethod
    def from_dict(cls, channels: Mapping[str, int]) -> Policy:
        return cls(tuple(sorted(channels.items())))

    def to_dict(self) -> dict[str, int]:
        return dict(self.items)

    def __getitem__(self, name: str) -> int:
        for k, v in self.items:
            if k == name:
                return v
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self.items)

    def get(self, name: str, default: int | None = None) -> int | None:
        return self.to_dict().get(name, default)

    def to_json(self) -> str:
        return json.dumps({"channels": self.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "policy") -> Policy:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); expected "
                            '{"channels": {"group": channels_kept, ...}}') from e
        channels = obj.get("channels") if isinstance(obj, dict) else None
        if channels is None and isinstance(obj, dict) and isinstance(obj.get("policy"), dict):
            channels = obj["policy"]  # a candidate: a line of candidates.jsonl, a Pareto point
        if not isinstance(channels, dict):
            raise UserError(f'{source} lacks a "channels" object; expected '
                            '{"channels": {"group": channels_kept, ...}} (or a candidate of a '
                            'study, with its "policy")')
        return cls.from_dict(channels)

    def save(self, path: str | Path) -> Path:
        from ._io import write_json

        return write_json(path, {"channels": self.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"policy file {str(path)!r} not found; check `--policy`")
        return cls.from_json(path.read_text(), source=f"policy file {str(path)!r}")
