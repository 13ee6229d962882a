"""The README's environment-variable table names every ``JAXLLM_*`` variable the code reads (the one jaxllm sets for
its own child processes aside), so a new switch cannot go undocumented."""

import re

from tests.test_layout import REPO_ROOT

SET_BY_JAXLLM_ITSELF = {"JAXLLM_DEFAULTED_ENV"}  # jaxllm.process_env: which pool settings jaxllm filled in


def variables_read_by_the_code() -> set[str]:
    names = set()
    for package in ("jaxllm", "sharding", "pallas_kernels", "benchmarks"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"[\"'](JAXLLM_[A-Z0-9_]+)[\"']", path.read_text()))
    return names - SET_BY_JAXLLM_ITSELF


def test_readme_table_lists_every_variable():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Environment variables") :]
    section = section[: section.index("\n### ")]
    documented = set(re.findall(r"^\| `(JAXLLM_[A-Z0-9_]+)`", section, flags=re.MULTILINE))
    read = variables_read_by_the_code()
    assert {"JAXLLM_CACHE_DIR", "JAXLLM_STABLE_STEP_OUTPUTS"} <= read, read  # (the scan itself works)
    assert read <= documented, f"not in the README's table: {sorted(read - documented)}"
