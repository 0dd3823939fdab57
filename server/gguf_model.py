"""`--model` given as a GGUF file (or a folder holding exactly one): converted once into the model cache
under the loraplex home and reused on later starts.

The cache folder is keyed by the file's sha256 digest: `$LORAPLEX_HOME/models/gguf/<digest>/<file stem>`
(the stem is the served model's name). A file with the same content is converted only once, wherever it
lies; a changed file gets a new digest and is converted again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from loraplex.server.default_model import loraplex_home
from loraplex.server.gguf_convert import GGUF_SUFFIX, convert_gguf, gguf_architecture
from loraplex.server.model_files import UnsupportedModel

log = logging.getLogger(__name__)


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `--model PATH` names: PATH itself (a .gguf file), the one .gguf file in the folder PATH
    when it has no config.json, or None (a Hugging Face folder, or nothing GGUF). UnsupportedModel when
    the folder holds several."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        raise UnsupportedModel(f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                               "pass the one to serve as --model FILE.gguf")
    return found[0] if found else None


def served_folder(path: Path) -> Path:
    """The Hugging Face folder that `--model PATH` serves: PATH itself, or its GGUF file's converted copy."""
    found = gguf_file(path)
    return path if found is None else converted_gguf(found)


def converted_gguf(gguf_path: Path) -> Path:
    """The converted folder of a GGUF file in the cache, converting it when its digest is not there yet;
    an architecture the engine does not serve is refused before anything is converted."""
    digest = file_digest(gguf_path)
    target = loraplex_home() / "models" / "gguf" / digest / gguf_path.stem
    if (target / "config.json").is_file():
        return target
    architecture = gguf_architecture(gguf_path)
    log.info("converting %s (%s, sha256 %s) into %s, once", gguf_path, architecture, digest[:12], target)
    convert_gguf(gguf_path, target)
    return target


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
