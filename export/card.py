"""The model card of a bundle (runtime.bundle's `card` section): read from `--card FILE` with `--name` /
`--version` over it (`read_card`, for `sonoscore train` and `sonoscore export`), or the default one a bundle gets
when none is given (`default_card`).
"""
from __future__ import annotations

import json
from pathlib import Path


def default_card(name: str, *, demo: bool, data_source: str | None = None) -> dict:
    """The model card a bundle gets when none is given (runtime.bundle's `card` section)."""
    card = {"name": name, "version": _sonoscore_version() if demo else "unversioned"}
    if demo:
        card.update({"description": "IFTA grader trained by sonoscore on its synthetic kidney phantom",
                     "intended_use": "demonstration and testing of the runtime only; not for clinical use",
                     "data_source": data_source or "synthetic kidney phantom (sonoscore sim)"})
    elif data_source:
        card["data_source"] = data_source
    return card


def _sonoscore_version() -> str:
    try:
        import importlib.metadata
        return importlib.metadata.version("sonoscore")
    except Exception:  # noqa: BLE001 (not installed: running from a checkout)
        return "0.1.0"


CARD_KEYS = ("name", "version", "description", "changelog", "authors", "license", "intended_use", "data_source",
             "references", "disclaimer")


def read_card(path: Path | str | None, name: str | None, version: str | None, default_name: str) -> dict:
    """The model card from --card FILE (JSON or YAML, keys CARD_KEYS; `licence` is taken for `license`), with
    --name and --version over the file's. One sentence for a file that cannot be read or a field of the wrong
    type."""
    from runtime.errors import UserError
    card: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--card '{path}' does not exist; give a JSON or YAML file with the model card's fields")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--card '{path}' cannot be read as UTF-8 text ({type(e).__name__}); give a JSON or YAML "
                            f"file") from None
        try:
            if path.suffix.lower() == ".json":
                card = json.loads(text)
            else:
                import yaml
                card = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 (json.JSONDecodeError, yaml.YAMLError)
            if isinstance(e, json.JSONDecodeError):
                line = e.lineno
            else:   # yaml marks count lines from 0
                mark = getattr(e, "problem_mark", None)
                line = None if mark is None else mark.line + 1
            at = f" near line {line}" if line is not None else ""
            raise UserError(f"--card '{path}' is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}"
                            f"{at}; fix the file") from None
        if card is None:
            card = {}
        if not isinstance(card, dict):
            raise UserError(f"--card '{path}' holds a {type(card).__name__}, not a mapping of the card's fields "
                            f"({', '.join(CARD_KEYS)})")
        if "licence" in card and "license" not in card:
            card["license"] = card.pop("licence")
        unknown = [str(k) for k in card if k not in CARD_KEYS]
        if unknown:
            raise UserError(f"--card '{path}' has field '{unknown[0]}', which a model card does not have; use "
                            f"{', '.join(CARD_KEYS)}")
    where = f"--card '{path}'" if path else "the model card"

    def text_field(key):
        v = card.get(key)
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)   # version: 1.0 written without quotes
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{where} field '{key}' must be text, got {v!r}")
        return v.strip()

    out: dict = {}
    for key in ("name", "version", "description", "license", "intended_use", "data_source", "disclaimer"):
        v = text_field(key)
        if v is not None:
            out[key] = v
    for key in ("authors", "references"):
        v = card.get(key)
        if v is None:
            continue
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise UserError(f"{where} field '{key}' must be a list of text (or one text), got {v!r}")
        out[key] = [x.strip() for x in v]
    log = card.get("changelog")
    if log is not None:
        if not isinstance(log, dict) or not all(isinstance(t, str) for t in log.values()):
            raise UserError(f"{where} field 'changelog' must map each version to its text, got {log!r}")
        out["changelog"] = {str(k): t for k, t in log.items()}
    if name is not None:
        if not str(name).strip():
            raise UserError("--name is empty; give the model's name")
        out["name"] = str(name).strip()
    if version is not None:
        if not str(version).strip():
            raise UserError("--version is empty; give the model's version")
        out["version"] = str(version).strip()
    out.setdefault("name", default_name)
    out.setdefault("version", "unversioned")
    return {"name": out.pop("name"), "version": out.pop("version"), **out}
