"""Label and token vocabularies, built from the train split and saved as JSON.

- :class:`LabelVocab`: class names -> ids ``0..n-1`` (sorted, so the order is stable).
- :class:`TokenVocab`: CTC tokens.  **Id 0 is the CTC blank; tokens start at 1.**
  ``unit="phoneme"`` splits transcripts on whitespace (space-separated phonemes);
  ``unit="char"`` uses single characters, with the space written as ``"|"`` (the
  word delimiter wav2vec2 uses).

Both save to and load from JSON (never pickle), so dev/test and later runs use the
same ids as training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["LabelVocab", "TokenVocab", "load_vocab", "BLANK_ID", "WORD_DELIMITER"]

#: CTC blank id.
BLANK_ID = 0
#: Token standing for a space in character transcripts.
WORD_DELIMITER = "|"


@dataclass(frozen=True)
class LabelVocab:
    """Class labels in a fixed order; ``ids`` maps a label to its position."""

    labels: tuple[str, ...]
    ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = tuple(str(x) for x in self.labels)
        if len(set(labels)) != len(labels):
            raise ValueError("duplicate labels in a LabelVocab")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", {label: i for i, label in enumerate(labels)})

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "LabelVocab":
        """The sorted set of ``labels`` (e.g. the train split's label column)."""
        return cls(tuple(sorted({str(x) for x in labels})))

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, label: str) -> int:
        try:
            return self.ids[str(label)]
        except KeyError:
            raise ValueError(f"label {label!r} is not in the vocabulary ({len(self)} labels from train)") from None

    def decode(self, index: int) -> str:
        return self.labels[index]

    def to_dict(self) -> dict:
        return {"kind": "labels", "labels": list(self.labels)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
        return path


@dataclass(frozen=True)
class TokenVocab:
    """CTC output tokens; token ``tokens[i]`` has id ``i + 1`` (0 is the blank)."""

    tokens: tuple[str, ...]
    unit: str = "phoneme"
    ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unit not in ("phoneme", "char"):
            raise ValueError(f"unit must be 'phoneme' or 'char', got {self.unit!r}")
        tokens = tuple(str(t) for t in self.tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens in a TokenVocab")
        if any(not t or t.isspace() for t in tokens):
            raise ValueError("empty or whitespace tokens are not allowed in a TokenVocab")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "ids", {t: i + 1 for i, t in enumerate(tokens)})

    @staticmethod
    def split(transcript: str, unit: str = "phoneme") -> list[str]:
        """Tokens of a transcript (before mapping to ids)."""
        if unit == "phoneme":
            return transcript.split()
        return [WORD_DELIMITER if c == " " else c for c in " ".join(transcript.split())]

    @classmethod
    def from_transcripts(cls, transcripts: Iterable[str], unit: str = "phoneme",
                         base: Sequence[str] = ()) -> "TokenVocab":
        """``base`` tokens first (in order), then every other token seen, sorted."""
        seen = {t for text in transcripts for t in cls.split(str(text), unit)}
        base = list(base)
        extra = sorted(seen - set(base))
        return cls(tuple(base + extra), unit)

    @property
    def size(self) -> int:
        """Number of CTC classes including the blank (the output layer's width)."""
        return len(self.tokens) + 1

    def __len__(self) -> int:
        return self.size

    def unknown_tokens(self, transcript: str) -> list[str]:
        return [t for t in self.split(transcript, self.unit) if t not in self.ids]

    def encode(self, transcript: str) -> list[int]:
        ids = []
        for token in self.split(transcript, self.unit):
            if token not in self.ids:
                raise ValueError(f"token {token!r} of transcript {transcript!r} is not in the vocabulary")
            ids.append(self.ids[token])
        return ids

    def decode(self, ids: Iterable[int], collapse: bool = False) -> str:
        """Ids back to a transcript; ``collapse=True`` applies CTC's merge-repeats-drop-blanks."""
        out: list[str] = []
        previous = None
        for i in ids:
            i = int(i)
            if collapse and i == previous:
                continue
            previous = i
            if i == BLANK_ID or i < 0:
                continue
            out.append(self.tokens[i - 1])
        if self.unit == "phoneme":
            return " ".join(out)
        return "".join(" " if t == WORD_DELIMITER else t for t in out)

    def to_dict(self) -> dict:
        return {"kind": "ctc", "unit": self.unit, "blank": BLANK_ID, "tokens": list(self.tokens)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
        return path


def load_vocab(path: str | Path) -> LabelVocab | TokenVocab:
    """Load a vocabulary saved by ``LabelVocab.save`` or ``TokenVocab.save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"vocabulary file {path} is not valid JSON: {err}") from err
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "labels":
        return LabelVocab(tuple(data["labels"]))
    if kind == "ctc":
        if data.get("blank", BLANK_ID) != BLANK_ID:
            raise ValueError(f"{path}: only blank id {BLANK_ID} is supported")
        return TokenVocab(tuple(data["tokens"]), data.get("unit", "phoneme"))
    raise ValueError(f"{path} is not a pefttune vocabulary (kind must be 'labels' or 'ctc')")
