"""Wheels made on the spot for the dependency tests: pure-Python packages written straight into a wheel
archive (no build backend, no index), so no test needs the internet."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["make_wheel"]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, name: str, version: str, modules: Mapping[str, str], *,
               requires: Sequence[str] = (), tag: str = "py3-none-any") -> Path:
    """Write ``name-version-<tag>.whl`` into ``folder``: ``modules`` maps paths inside the wheel
    (``tinydep/__init__.py``) to their text; ``requires`` become its ``Requires-Dist``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {item}\n" for item in requires)
    files: dict[str, bytes] = {path: text.encode() for path, text in modules.items()}
    files[f"{dist}.dist-info/METADATA"] = metadata.encode()
    files[f"{dist}.dist-info/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: rx-testbed\nRoot-Is-Purelib: true\n"
                                        f"Tag: {tag}\n").encode()
    record = [_record_line(path, data) for path, data in files.items()]
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in files.items():
            info = zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return path
