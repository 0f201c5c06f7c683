"""Dependency audit: ``pip-audit`` over requirements.lock (every pinned package, no resolution, no install).

    python scripts/audit.py [--lock requirements.lock] [--service pypi,osv] [--strict] [--out audit.json]

Exit status: 1 if any pinned package has a known vulnerability; 0 otherwise. When the vulnerability
database cannot be reached (no network, a mirror without PyPI's JSON API, OSV blocked), the audit did not
happen: it says so plainly, lists how many packages went unchecked and why, and exits 0 so CI does not fail
for the network (``--strict`` exits 2 instead).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Audit:
    service: str
    packages: int = 0
    audited: int = 0
    vulnerable: dict[str, list[str]] = field(default_factory=dict)  # "name==version" -> vulnerability ids
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    failure: str | None = None  # pip-audit itself failed (no report)

    @property
    def complete(self) -> bool:
        return self.failure is None and self.packages > 0 and self.audited == self.packages

    def summary(self) -> str:
        if self.failure is not None:
            return f"pip-audit ({self.service}): NOT RUN, the audit failed: {self.failure}"
        head = f"pip-audit ({self.service}): {self.packages} pinned packages, {self.audited} checked"
        if self.vulnerable:
            found = "; ".join(f"{p}: {', '.join(ids)}" for p, ids in sorted(self.vulnerable.items()))
            head += f", {len(self.vulnerable)} VULNERABLE ({found})"
        elif self.audited:
            head += ", no known vulnerabilities"
        if self.skipped:
            reasons = sorted({why.split(":")[0] for why in self.skipped.values()})
            head += f"; {len(self.skipped)} NOT CHECKED ({'; '.join(reasons)})"
            if not self.audited:
                head += ": the vulnerability database is unreachable from here, so the audit did not happen"
        return head


def parse_report(report: dict[str, Any], service: str) -> Audit:
    """An :class:`Audit` from pip-audit's ``--format json`` output."""
    audit = Audit(service)
    for dep in report.get("dependencies", []):
        audit.packages += 1
        if dep.get("skip_reason"):
            audit.skipped[dep["name"]] = dep["skip_reason"]
            continue
        audit.audited += 1
        if dep.get("vulns"):
            audit.vulnerable[f"{dep['name']}=={dep.get('version')}"] = [v["id"] for v in dep["vulns"]]
    return audit


def run_audit(lock: Path, service: str, timeout_s: float = 600.0) -> Audit:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        command = [sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--no-deps", "--disable-pip",
                   "--format", "json", "--output", str(out), "--progress-spinner", "off",
                   "--vulnerability-service", service]  # fmt: skip
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Audit(service, failure=f"no answer within {timeout_s:.0f} s")
        if not out.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return Audit(service, failure=f"exit {proc.returncode}: {last[:300]}")
        return parse_report(json.loads(out.read_text()), service)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    ap.add_argument("--service", default="pypi,osv", help="vulnerability services to try in turn")
    ap.add_argument("--strict", action="store_true", help="exit 2 when the audit could not be completed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per service")
    ap.add_argument("--out", type=Path, help="write the result as JSON")
    args = ap.parse_args()
    audits = []
    for service in args.service.split(","):
        audits.append(run_audit(args.lock, service.strip(), args.timeout))
        print(audits[-1].summary(), flush=True)
        if audits[-1].complete:
            break
    if args.out:
        args.out.write_text(json.dumps([a.__dict__ for a in audits], indent=2))
    if any(a.vulnerable for a in audits):
        sys.exit(1)
    if not any(a.complete for a in audits):
        print("dependency audit incomplete: not a failure unless --strict", file=sys.stderr)
        sys.exit(2 if args.strict else 0)


if __name__ == "__main__":
    main()
