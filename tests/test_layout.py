"""The repository's house rules that code can check: src/ says what and why without measured
figures, machine names or dates (those live in benchmarks/RESULTS.md and docs/); the models
reach machine-specific code only through `sd3.kernels`; nothing reads files beside the repo."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sd3"

STALE = re.compile(
    r"GFLOP/s|\b[0-9.]+ ?s (per|a) step|Xeon|EPYC|Zen ?[0-9]|\b[AH]100\b|\bH200\b|\bUTC\b"
    r"|Sapphire Rapids|Cooper Lake|\b[0-9]+\.[0-9]+x\b|\b[0-9]+x (faster|slower)"
    r"|\bon [0-9]+ [A-Za-z0-9 -]*cores\b|\b20[0-9]{2}-[0-9]{2}-[0-9]{2}\b"
)


def stale_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if STALE.search(line)]


def test_the_check_catches_what_it_is_for():
    caught = [
        "steps (1024² bf16: 7.1-7.25 s a step instead of 7.3-7.45 on 2 AMX cores)",
        "about 1,200-1,300 GFLOP/s at the MMDiT's shapes",
        "(1.16-1.19x on Zen 4)",
        "the first step compiles (70-90 s for SD3.5 on an H200)",
        "a faster path (6x faster than the mixed-dtype kernel)",
        "measured 2026-12-06 07:38 UTC on an Intel Xeon",
        "int8 GEMM on 2 AMD EPYC cores",
    ]
    passed = [
        "nearest 2x upsampling, then a 3x3 conv",
        "a 32 MB mmap threshold, trimming above 64 MB",
        "16 products per output pixel and channel pair instead of 36",
        "SD3.5 Medium at 1024² (4,096 image tokens)",
    ]
    assert [line for line in caught if not STALE.search(line)] == []
    assert [line for line in passed if STALE.search(line)] == []


def test_src_carries_no_timings_machine_names_or_dates():
    hits = [
        f"{path.relative_to(ROOT)}: {line}"
        for path in sorted(SRC.rglob("*"))
        if path.suffix in {".py", ".cpp", ".h"}
        for line in stale_lines(path.read_text())
    ]
    assert hits == [], "move these figures to benchmarks/RESULTS.md or docs/:\n" + "\n".join(hits)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, level) of every import in a file: level 0 absolute, 1 `.x`, 2 `..x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_models_reach_machine_specific_code_only_through_the_kernels_package():
    """models/ imports torch, the standard library, its sibling models and `sd3.kernels` (the
    package's interface, not its modules): no ctypes, compilers, allocators or CPU flags."""
    allowed_absolute = {"torch", *sys.stdlib_module_names} - {"ctypes", "subprocess", "platform"}
    wrong = []
    for path in sorted((SRC / "models").glob("*.py")):
        for module, level in imported_modules(path):
            ok = (
                (level == 0 and module.split(".")[0] in allowed_absolute)
                or (level == 1 and "." not in module)  # a sibling model
                or (level == 2 and module in ("", "kernels"))  # `from .. import kernels`
                or (level == 0 and module == "sd3.kernels")
            )
            if not ok:
                wrong.append(f"{path.name}: {'.' * level}{module}")
    assert wrong == []


def test_nothing_reads_files_beside_the_repository():
    pattern = re.compile(r"\.\./shared|\"shared\" ?/|parents\[[2-9]\] ?/ ?\"shared\"")
    hits = [
        f"{path.relative_to(ROOT)}"
        for folder in ("src", "tests", "scripts", "benchmarks", ".ci")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file()
        and path.suffix in {".py", ".sh", ""}
        and path.name != "test_layout.py"
        and pattern.search(path.read_text(errors="ignore"))
    ]
    assert hits == []
