"""scripts/audit.py: how pip-audit's report is read (the audit itself needs the network and runs in CI)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.security


def _audit_module():
    spec = importlib.util.spec_from_file_location("audit_script", REPO / "scripts" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_script"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_an_unreachable_database_is_reported_as_no_audit_not_as_clean() -> None:
    audit = _audit_module()
    why = "Dependency not found on PyPI and could not be audited: torch (2.13.0)"
    report = {"dependencies": [{"name": "torch", "skip_reason": why}, {"name": "ray", "skip_reason": why}]}
    result = audit.parse_report(report, "pypi")
    assert result.packages == 2 and result.audited == 0 and not result.complete
    text = result.summary()
    assert "0 checked" in text and "2 NOT CHECKED" in text and "the audit did not happen" in text
    assert "no known vulnerabilities" not in text
    assert "NOT RUN" in audit.Audit("osv", failure="exit 1: ConnectionError").summary()


def test_vulnerabilities_and_a_complete_clean_audit() -> None:
    audit = _audit_module()
    deps = [{"name": "a", "version": "1.0", "vulns": [{"id": "GHSA-1"}, {"id": "PYSEC-2"}]},
            {"name": "b", "version": "2.0", "vulns": []}]  # fmt: skip
    bad = audit.parse_report({"dependencies": deps}, "osv")
    assert bad.complete and bad.vulnerable == {"a==1.0": ["GHSA-1", "PYSEC-2"]}
    assert "1 VULNERABLE (a==1.0: GHSA-1, PYSEC-2)" in bad.summary()
    clean = audit.parse_report({"dependencies": deps[1:]}, "osv")
    assert clean.complete and clean.summary().endswith("1 checked, no known vulnerabilities")
