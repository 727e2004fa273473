"""Print what differs between the checked-in constraints (what CI is green with) and a venv's freeze.

    python .ci/drift.py constraints.txt <(pip freeze --exclude-editable)

Used by `make test-latest` to record the drift the newest releases bring; exits 0 either way.
"""

from __future__ import annotations

import re
import sys


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def main(locked_path: str, current_path: str) -> int:
    locked, current = pins(locked_path), pins(current_path)
    changed = sorted(n for n in locked.keys() & current.keys() if locked[n] != current[n])
    added, removed = sorted(current.keys() - locked.keys() - {"torch"}), sorted(locked.keys() - current.keys())
    print(f"drift against {locked_path}: {len(changed)} changed, {len(added)} new, {len(removed)} gone")
    for n in changed:
        print(f"  {n}: {locked[n]} -> {current[n]}")
    for n in added:
        print(f"  {n}: new ({current[n]})")
    for n in removed:
        print(f"  {n}: no longer installed (was {locked[n]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
