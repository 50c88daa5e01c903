#!/usr/bin/env python3
"""Prints which of regproxy's top-level modules use which (`crate::X` paths, and `super::X` from
a submodule into a sibling), and any cycles between them. Usage: scripts/modgraph.py [SRC_DIR]"""
import re
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src")
top = {p.stem if p.is_file() else p.name for p in src.iterdir()
       if (p.suffix == ".rs" and p.stem not in ("lib", "main")) or (p.is_dir() and (p / "mod.rs").exists())}

def module_of(path: Path) -> str:
    rel = path.relative_to(src).parts
    return rel[0].removesuffix(".rs")

edges: dict[str, set[str]] = {m: set() for m in top}
for f in src.rglob("*.rs"):
    m = module_of(f)
    if m not in top:
        continue
    text = re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", f.read_text(), flags=re.S)
    for used in re.findall(r"\bcrate::([a-z_]+)", text):
        if used in top and used != m:
            edges[m].add(used)
    # `use crate::{a, b::c}` groups.
    for group in re.findall(r"use crate::\{([^}]*)\}", text):
        for used in re.findall(r"(?:^|,)\s*([a-z_]+)", group):
            if used in top and used != m:
                edges[m].add(used)

for m in sorted(edges):
    print(f"{m:12} -> {', '.join(sorted(edges[m])) or '(nothing)'}")

cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
print()
print("cycles:", ", ".join(f"{a} <-> {b}" for a, b in cycles) if cycles else "none")
