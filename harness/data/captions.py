"""MVTec Caption texts: the official `<category>/prompt/<defect>/NNN.txt` files, or a JSON file.

The JSON form is `{category: {defect_type: [caption_0, caption_1, ...]}}`; caption i describes
`test/<defect_type>/<i:03d>.png`, as in the MVTec-Caption construction scripts.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import DataError

PROMPT_DIR = "prompt"


class CaptionSource:
    """Where captions come from; `lookup` returns None when a caption is absent."""

    def lookup(self, category_dir: Path, category: str, defect: str, file_id: str) -> str | None:
        raise NotImplementedError

    def where(self, category_dir: Path, category: str, defect: str, file_id: str) -> str:
        """Where the caption for this image was expected, for error messages."""
        raise NotImplementedError


class PromptFolderCaptions(CaptionSource):
    """`<category>/prompt/<defect>/<file_id>.txt` inside the data set, as the official scripts write them."""

    def lookup(self, category_dir: Path, category: str, defect: str, file_id: str) -> str | None:
        path = category_dir / PROMPT_DIR / defect / f"{file_id}.txt"
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8").strip()
        return text or None

    def where(self, category_dir: Path, category: str, defect: str, file_id: str) -> str:
        return str(category_dir / PROMPT_DIR / defect / f"{file_id}.txt")


class JsonCaptions(CaptionSource):
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(self.path, "caption file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(self.path, f"not valid JSON ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise DataError(self.path, "expected {category: {defect_type: [caption_0, ...]}}")
        self.data: dict[str, dict[str, list[str]]] = data

    def lookup(self, category_dir: Path, category: str, defect: str, file_id: str) -> str | None:
        captions = self.data.get(category, {}).get(defect)
        if captions is None or not file_id.isdigit() or int(file_id) >= len(captions):
            return None
        return str(captions[int(file_id)]).strip() or None

    def where(self, category_dir: Path, category: str, defect: str, file_id: str) -> str:
        return f"{self.path} [{category!r}][{defect!r}][{int(file_id) if file_id.isdigit() else file_id}]"


def caption_source(category_dir: Path, json_path: Path | None) -> CaptionSource | None:
    """The explicit JSON file if given, else the prompt folders if the category has them, else None."""
    if json_path is not None:
        return JsonCaptions(json_path)
    if (category_dir / PROMPT_DIR).is_dir():
        return PromptFolderCaptions()
    return None
