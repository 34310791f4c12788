"""The extension's Extensions Index description (ConvLoRA.json, kept beside ConvLoRA.s4ext) and what its CI checks.

From Slicer 5.8 on the Extensions Index takes ``<Extension>.json`` with the schema
``Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json`` of the Slicer repository: required ``$schema``,
``category`` and ``scm_url``; optional ``scm_revision``, ``scm_type``, ``build_dependencies``,
``build_subdirectory``, ``enabled`` and ``tier`` (1-5); nothing else. Its CI (``scripts/check_description_files.py``
of Slicer/ExtensionsIndex) downloads the icon and every screenshot URL of the top-level CMakeLists.txt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
ALLOWED = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
           "enabled", "tier"}
RAW = re.compile(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(\S+)")


def s4ext():
    fields = {}
    for line in (ROOT / "ConvLoRA.s4ext").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def cmake_value(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text())
    assert match, name
    return match.group(1)


def test_json_follows_the_catalog_schema():
    entry = json.loads((ROOT / "ConvLoRA.json").read_text())
    assert entry["$schema"] == SCHEMA_URL
    assert set(entry) <= ALLOWED, set(entry) - ALLOWED
    assert isinstance(entry["category"], str) and entry["scm_url"].startswith("https://github.com/")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert all(isinstance(d, str) for d in entry["build_dependencies"])


def test_json_s4ext_and_cmake_agree():
    entry, fields = json.loads((ROOT / "ConvLoRA.json").read_text()), s4ext()
    assert entry["category"] == fields["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == fields["depends"].split() == cmake_value("EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == fields["scmurl"].removesuffix(".git")
    assert entry["scm_revision"] == fields["scmrevision"] and entry["build_subdirectory"] == fields["build_subdirectory"]


def test_every_image_url_names_a_file_in_this_repository():
    urls = cmake_value("EXTENSION_SCREENSHOTURLS").split() + [cmake_value("EXTENSION_ICONURL")]
    urls += s4ext().get("screenshoturls", "").split() + [s4ext()["iconurl"]]
    for url in urls:
        match = RAW.match(url)
        assert match, f"not a raw.githubusercontent URL of this repository: {url}"
        assert (ROOT / match.group(1)).is_file(), f"{url}: {match.group(1)} is not in the repository"


def test_contributors_are_real_names_or_the_readme_says_they_are_unknown():
    contributors = [c.strip() for c in cmake_value("EXTENSION_CONTRIBUTORS").split(",")]
    if all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors):
        return
    readme = (ROOT / "README.md").read_text()
    assert "contributors are not known" in readme, "placeholder contributors, and the README does not say so"
