#!/usr/bin/env python3
"""Import cycles among the top-level modules of Rust crates.

Usage: check-imports.py SRC_DIR...

For each SRC_DIR (a crate's src/), every top-level module (`foo.rs` or `foo/`) is a
node, and module A depends on module B when a file of A names `crate::B` (in `use`
lines, grouped `use crate::{b, c::d}` forms, and paths in code) or, from inside a
folder module, `super::B`. Comments and string literals are ignored, and so are
`#[cfg(test)]` modules' own `super::*` (a test module's parent is its own module).
Prints every cycle (each strongly connected component of more than one module, or a
module that imports itself through a path) and exits 1 if there is one; exits 0 and
prints nothing otherwise. main.rs and lib.rs are roots, not modules: they may name
anything.
"""

import re
import sys
from pathlib import Path

ROOTS = {"main", "lib"}


def strip_comments_and_strings(text: str) -> str:
    """Removes // and /* */ comments and string/char literals, keeping line breaks."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (lit := re.match(r"'(\\[^']*|[^\\'])'", text[i:])):
            i += len(lit.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_groups(path: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    path = re.sub(r"\s+", "", path)
    m = re.search(r"\{", path)
    if not m:
        return [path]
    prefix, rest = path[: m.start()], path[m.start() + 1 :]
    depth, items, cur = 0, [], ""
    for ch in rest:
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [p for item in items if item for p in expand_groups(prefix + item)]


def references(code: str, base: str) -> set[str]:
    """Top-level module names that `code` reaches through `base::` (crate or super)."""
    found = set()
    # Grouped forms first: `crate::{a, b::c}` (possibly over several lines).
    for m in re.finditer(rf"\b{base}::\{{", code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        for p in expand_groups(code[m.start() : j]):
            found.add(p.split("::")[1])
    for m in re.finditer(rf"\b{base}::(\w+)", code):
        found.add(m.group(1))
    return found


def without_test_modules(code: str) -> str:
    """Drops `#[cfg(test)] mod x { ... }` blocks: tests may use anything."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", code):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        out.append(code[i : m.start()])
        i = j
    out.append(code[i:])
    return "".join(out)


def graph(src: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in src.glob("*.rs")} | {p.name for p in src.iterdir() if p.is_dir()}
    modules -= ROOTS
    deps: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        files = [src / f"{m}.rs"] if (src / f"{m}.rs").exists() else []
        if (src / m).is_dir():
            files += sorted((src / m).rglob("*.rs"))
        for f in files:
            code = without_test_modules(strip_comments_and_strings(f.read_text()))
            names = references(code, "crate")
            # `super::x` inside a folder module's direct children names a sibling
            # top-level module only from `m/x.rs`, whose parent is `m` itself; from
            # `m/mod.rs` or `m.rs` it names the crate root's children.
            if f.parent == src or f.name == "mod.rs" and f.parent.parent == src:
                names |= references(code, "super")
            deps[m] |= {n for n in names if n in modules and n != m}
    return deps


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(deps):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(deps: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest import path from comp[0] back to itself, within the component."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(deps[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return comp


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    found = False
    for arg in argv[1:]:
        src = Path(arg)
        if not src.is_dir():
            print(f"check-imports: {src} is not a directory", file=sys.stderr)
            return 2
        deps = graph(src)
        for comp in cycles(deps):
            found = True
            path = " -> ".join(one_cycle(deps, comp))
            print(f"import cycle in {src}: {' <-> '.join(comp)} (e.g. {path})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
