"""Check the guide's WordPiece tokenizer against `tokenizers` on your texts.

``WordPieceTokenizer`` in CartosplitDevice.kt is ported here line by line (same normalization, same
character classes as Java's, same greedy longest match), so a mismatch here points at a step the Kotlin
code gets wrong too. It also prints golden ids for an app's unit test.

    python docs/android/wordpiece_check.py BUNDLE/tokenizer.json texts.txt [--max-length 128] [--show 5]

texts.txt: one text per line (a GLUE TSV works too: the first column is taken). Exit code 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_JAVA_WHITESPACE = set(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")  # Character.isWhitespace beyond the Z* categories


class GuideWordPiece:
    """The Kotlin ``WordPieceTokenizer``, in Python: single texts, ``[CLS] pieces [SEP]``."""

    def __init__(self, tokenizer_json: str | Path, max_length: int) -> None:
        model = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]
        if model["type"] != "WordPiece":
            raise ValueError("expected a WordPiece tokenizer.json")
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.max_length = max_length

    @staticmethod
    def _control(c: str) -> bool:
        return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn")

    @staticmethod
    def _whitespace(c: str) -> bool:  # Character.isWhitespace(c) || Character.isSpaceChar(c)
        return c in _JAVA_WHITESPACE or unicodedata.category(c) in ("Zs", "Zl", "Zp")

    @staticmethod
    def _punctuation(c: str) -> bool:
        o = ord(c)
        ascii_punct = 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126
        return ascii_punct or unicodedata.category(c) in ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po")

    def normalize(self, text: str) -> str:
        out = []
        for c in text:
            if ord(c) in (0, 0xFFFD) or self._control(c):
                continue
            if self._whitespace(c):
                out.append(" ")
            elif any(lo <= ord(c) <= hi for lo, hi in _CJK):
                out.append(f" {c} ")
            else:
                out.append(c)
        decomposed = unicodedata.normalize("NFD", "".join(out).lower())
        return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")

    def words(self, text: str) -> list[str]:
        words, current = [], []
        for c in text:
            if self._whitespace(c) or self._punctuation(c):
                if current:
                    words.append("".join(current))
                    current = []
                if not self._whitespace(c):
                    words.append(c)
            else:
                current.append(c)
        if current:
            words.append("".join(current))
        return words

    def pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while start < end and ("##" if start else "") + word[start:end] not in self.vocab:
                end -= 1
            if start == end:
                return [self.unk]
            pieces.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return pieces

    def encode(self, text: str) -> list[int]:
        ids = [self.cls]
        for word in self.words(self.normalize(text)):
            ids += self.pieces(word)
        return [*ids[: self.max_length - 1], self.sep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_json")
    parser.add_argument("texts", help="one text per line (TSV: first column)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--show", type=int, default=3, help="golden ids to print for an app's unit test")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's device_runtime
    from cartosplit.device_runtime.text import encode, load_tokenizer

    reference = load_tokenizer(args.tokenizer_json, args.max_length)
    guide = GuideWordPiece(args.tokenizer_json, args.max_length)
    texts = [line.split("\t")[0] for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    mismatches = 0
    for text in texts:
        want, got = encode(reference, [text])[0][0], guide.encode(text)
        if got != want:
            mismatches += 1
            if mismatches <= 5:
                print(f"mismatch: {text[:60]!r}\n  guide      {got[:16]}\n  tokenizers {want[:16]}")
    for text in texts[: args.show]:
        print(f"golden: {text[:60]!r} -> {guide.encode(text)}")
    print(f"{len(texts)} texts, {mismatches} mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
