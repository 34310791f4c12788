"""The Slicer extension is complete: CMake file lists match the disk, .s4ext fields, .ui widgets, icon.

Slicer's build copies exactly the files named in ConvLoRASeg/CMakeLists.txt; a library file that is on disk
but not listed would be missing from the installed extension (an ImportError only users would see), and a
listed file that is gone breaks the extension build. These checks need neither Slicer nor CMake.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ConvLoRASeg"
LIB_DIR = ROOT / "ConvLoRASegLib"
S4EXT = ROOT / "ConvLoRA.s4ext"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ConvLoRASeg.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "ConvLoRASeg.png"

# screenshoturls is optional: no screenshot exists yet (Testing/test_slicer_index.py checks any URL named)
S4EXT_FIELDS = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "enabled")
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}
IGNORED_SUFFIXES = {".pyc", ".pyo"}


def cmake_set_blocks(text: str) -> Dict[str, List[str]]:
    """Variables assigned with ``set(NAME arg arg ...)`` in a CMake file.

    A small tokenizer: quoted arguments keep their spaces, parentheses and ``#``; ``#`` outside quotes starts
    a comment; the command ends at its unquoted ``)``.
    """
    blocks: Dict[str, List[str]] = {}
    for match in re.finditer(r"(?<![A-Za-z_])set\(", text):
        args, pos, token = [], match.end(), None
        while True:
            ch = text[pos]
            if ch == '"':
                end = text.index('"', pos + 1)
                args.append(text[pos + 1:end])
                pos = end + 1
            elif ch == "#":
                pos = text.index("\n", pos)
            elif ch == ")":
                break
            elif ch.isspace():
                pos += 1
            else:
                token = re.match(r'[^\s()"#]+', text[pos:]).group(0)
                args.append(token)
                pos += len(token)
        if args:
            blocks[args[0]] = args[1:]
    return blocks


def expand(items: List[str], variables: Dict[str, str]) -> Set[str]:
    """Items with ``${VAR}`` replaced from ``variables``."""
    out = set()
    for item in items:
        for key, value in variables.items():
            item = item.replace("${" + key + "}", value)
        assert "${" not in item, f"unexpanded variable in CMake list item {item!r}"
        out.add(item.strip('"'))
    return out


def files_on_disk(folder: Path, relative_to: Path) -> Set[str]:
    """Every shipped file below ``folder`` as a POSIX path relative to ``relative_to``."""
    found = set()
    for path in folder.rglob("*"):
        if path.is_file() and not (IGNORED_PARTS & set(path.parts)) and path.suffix not in IGNORED_SUFFIXES:
            found.add(path.relative_to(relative_to).as_posix())
    return found


@pytest.fixture(scope="module")
def module_lists() -> Dict[str, Set[str]]:
    blocks = cmake_set_blocks((MODULE_DIR / "CMakeLists.txt").read_text())
    variables = {"MODULE_NAME": blocks["MODULE_NAME"][0]}
    return {name: expand(items, variables) for name, items in blocks.items() if name != "MODULE_NAME"}


def test_module_name_is_convloraseg(module_lists):
    blocks = cmake_set_blocks((MODULE_DIR / "CMakeLists.txt").read_text())
    assert blocks["MODULE_NAME"] == ["ConvLoRASeg"]


def test_module_scripts_match_disk(module_lists):
    """The module file and every file of the package beside it (ConvLoRASegModuleLib/) are installed."""
    on_disk = {p for p in files_on_disk(MODULE_DIR, MODULE_DIR) if p.endswith(".py")}
    assert {p for p in on_disk if "/" not in p} == {"ConvLoRASeg.py"}, "Slicer loads every top-level .py as a module"
    assert "ConvLoRASegModuleLib/__init__.py" in on_disk
    assert module_lists["MODULE_PYTHON_SCRIPTS"] == on_disk


def test_module_resources_match_disk(module_lists):
    on_disk = files_on_disk(MODULE_DIR / "Resources", MODULE_DIR)
    assert module_lists["MODULE_PYTHON_RESOURCES"] == on_disk


def test_library_scripts_match_disk(module_lists):
    on_disk = {p for p in files_on_disk(LIB_DIR, ROOT) if p.endswith(".py")}
    listed = module_lists["LIB_PYTHON_SCRIPTS"]
    assert not (on_disk - listed), f"library files missing from ConvLoRASeg/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert not (listed - on_disk), f"listed in ConvLoRASeg/CMakeLists.txt but not on disk: {sorted(listed - on_disk)}"


def test_library_resources_match_disk(module_lists):
    on_disk = {p for p in files_on_disk(LIB_DIR, ROOT) if not p.endswith(".py")}
    listed = module_lists.get("LIB_PYTHON_RESOURCES", set())
    assert not (on_disk - listed), f"library data missing from ConvLoRASeg/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert not (listed - on_disk), f"listed in ConvLoRASeg/CMakeLists.txt but not on disk: {sorted(listed - on_disk)}"


def test_module_cmake_builds_module_library_and_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    assert re.search(r"SOURCE_DIR\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\.", text), "library must be taken from the parent folder"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def read_s4ext() -> Dict[str, str]:
    fields = {}
    for line in S4EXT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    return fields


def test_s4ext_has_every_field():
    fields = read_s4ext()
    missing = [key for key in S4EXT_FIELDS if not fields.get(key)]
    assert not missing, f"empty or missing .s4ext fields: {missing}"
    assert fields["scm"] == "git"
    assert fields["enabled"] in ("0", "1")
    assert fields["depends"].split() == ["PyTorch"]
    assert fields["category"] == "Segmentation"
    assert fields["iconurl"].endswith("ConvLoRASeg/Resources/Icons/ConvLoRASeg.png")
    assert fields["scmurl"].startswith("https://") and fields["homepage"].startswith("https://")


def top_level_cmake_values() -> Dict[str, str]:
    """The top-level CMakeLists.txt's ``set()`` values, ``${VAR}`` of earlier ones expanded (as CMake does)."""
    values: Dict[str, str] = {}
    for name, items in cmake_set_blocks((ROOT / "CMakeLists.txt").read_text()).items():
        value = " ".join(items)
        for key, known in values.items():
            value = value.replace("${" + key + "}", known)
        values[name] = value
    return values


def test_top_level_cmake_matches_s4ext():
    text = (ROOT / "CMakeLists.txt").read_text()
    blocks = top_level_cmake_values()
    fields = read_s4ext()
    assert re.search(r"project\(\s*ConvLoRA\s*\)", text), "project name must equal the .s4ext file name"
    for cmake_name, s4ext_name in (("EXTENSION_CATEGORY", "category"), ("EXTENSION_DEPENDS", "depends"),
                                   ("EXTENSION_ICONURL", "iconurl"), ("EXTENSION_SCREENSHOTURLS", "screenshoturls"),
                                   ("EXTENSION_HOMEPAGE", "homepage"), ("EXTENSION_STATUS", "status")):
        assert blocks[cmake_name] == fields.get(s4ext_name, ""), cmake_name
    for needed in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert blocks.get(needed), needed
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(ConvLoRASeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line


def ui_widgets() -> Dict[str, ET.Element]:
    tree = ET.parse(UI_FILE)  # raises on malformed XML
    return {w.get("name"): w for w in tree.iter("widget")}


def module_sources() -> str:
    """The module file and its package (ConvLoRASegModuleLib/), concatenated."""
    paths = [MODULE_DIR / "ConvLoRASeg.py"] + sorted((MODULE_DIR / "ConvLoRASegModuleLib").glob("*.py"))
    return "\n".join(path.read_text() for path in paths)


def test_ui_is_wellformed_and_has_the_module_widgets():
    widgets = ui_widgets()
    source = module_sources()
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", source))
    assert used, "the module uses no self.ui.<widget> at all?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by the module but absent from the .ui: {missing}"


def test_ui_parameter_names_match_the_parameter_node():
    """Every SlicerParameterName in the .ui names a field of the @parameterNodeWrapper class."""
    tree = ET.parse(UI_FILE)
    names = set()
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names.add(prop.find("string").text)
    source = module_sources()
    match = re.search(r"@parameterNodeWrapper\s*\nclass \w+:\n(.*?)\n\n\n", source, flags=re.S)
    assert match, "no @parameterNodeWrapper class in the module"
    fields = set(re.findall(r"^    ([a-zA-Z_][a-zA-Z0-9_]*)\s*:", match.group(1), flags=re.M))
    assert names, "the .ui binds nothing to the parameter node"
    assert not (names - fields), f"SlicerParameterName without a parameter: {sorted(names - fields)}"


def test_icon_is_a_128_px_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_one_repository_url_everywhere():
    """The repository URL is set once (EXTENSION_REPOSITORY in the top-level CMakeLists.txt); every file that cannot
    read CMake repeats exactly it: the .s4ext, ConvLoRA.json, the icon URL and the module's help text."""
    import json
    import sys

    repository = top_level_cmake_values()["EXTENSION_REPOSITORY"]
    assert re.fullmatch(r"https://github\.com/[^/\s]+/[^/\s]+", repository), repository
    owner_and_name = repository.removeprefix("https://github.com/")
    raw = f"https://raw.githubusercontent.com/{owner_and_name}/"
    fields = read_s4ext()
    assert top_level_cmake_values()["EXTENSION_HOMEPAGE"] == repository + "#readme" == fields["homepage"]
    assert fields["scmurl"] == repository + ".git"
    assert json.loads((ROOT / "ConvLoRA.json").read_text())["scm_url"] == repository
    assert top_level_cmake_values()["EXTENSION_ICONURL"].startswith(raw) and fields["iconurl"].startswith(raw)
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from ConvLoRASegModuleLib import HOMEPAGE_URL, REPOSITORY_URL
    finally:
        sys.path.remove(str(MODULE_DIR))
    assert REPOSITORY_URL == repository and HOMEPAGE_URL == repository + "#readme"
    # no other github.com address of an extension repository hides in the files that describe the extension
    for path in (ROOT / "CMakeLists.txt", S4EXT, ROOT / "ConvLoRA.json", MODULE_DIR / "ConvLoRASeg.py",
                 *sorted((MODULE_DIR / "ConvLoRASegModuleLib").glob("*.py"))):
        text = path.read_text()
        for found in re.findall(r"https://(?:raw\.githubusercontent|github)\.com/([^/\s\"#]+/[^/\s\"#.]+)", text):
            assert found in (owner_and_name, "Slicer/Slicer"), f"{path.name} names another repository: {found}"


#: The Extensions Index's tiers (README of Slicer/ExtensionsIndex; the catalog schema's ``tier``): 1 experimental,
#: 3 community-supported, 5 supported by Slicer core developers. The .s4ext/CMake status says the same in words.
TIER_STATUS = {1: "Experimental", 3: "Community-supported", 5: "Core-supported"}


def test_status_and_tier_agree():
    import json

    tier = json.loads((ROOT / "ConvLoRA.json").read_text())["tier"]
    assert read_s4ext()["status"] == top_level_cmake_values()["EXTENSION_STATUS"] == TIER_STATUS[tier]


def test_the_docs_say_what_to_set_before_submitting():
    text = (ROOT / "docs" / "slicer.md").read_text()
    assert "## Before submitting to the Extensions Index" in text
    section = text.split("## Before submitting to the Extensions Index", 1)[1].split("\n## ", 1)[0]
    for needed in ("EXTENSION_REPOSITORY", "ConvLoRA.s4ext", "ConvLoRA.json", "REPOSITORY_URL",
                   "EXTENSION_CONTRIBUTORS", "EXTENSION_SCREENSHOTURLS", "tier"):
        assert needed in section, needed
