"""axe-core (the npm package, installed by `make test` into .cache/axe) run in a Playwright page: the
critical and serious accessibility violations of what the page renders.

Third-party reports embedded in an iframe (the Evidently drift report on Monitoring) are excluded: they are
not the project's markup. Everything else the page renders is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKING = ("critical", "serious")


def axe_script() -> Path | None:
    """axe.min.js: $CXRLT_AXE if set, else the copy `make test` installs (npm install --prefix .cache/axe)."""
    p = Path(os.environ.get("CXRLT_AXE") or ROOT / ".cache/axe/node_modules/axe-core/axe.min.js")
    return p if p.is_file() else None


def violations(page, exclude: tuple[str, ...] = ("iframe",)) -> list[dict]:
    """axe.run over the document (minus `exclude`) -> the violations of impact critical or serious, each as
    {id, impact, help, nodes: [target selectors and failure summaries]}."""
    script = axe_script()
    if script is None:
        raise RuntimeError("axe-core is not installed: npm install --prefix .cache/axe axe-core@4")
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(script))
    found = page.evaluate("""async (exclude) => {
        const r = await axe.run({exclude: exclude.map(s => [s])}, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target.join(' '), summary: n.failureSummary}))}));
    }""", list(exclude))
    return [v for v in found if v["impact"] in BLOCKING]


def describe(found: dict[str, list[dict]]) -> str:
    """The violations per page, readable in a test failure."""
    lines = []
    for page_name, vs in found.items():
        for v in vs:
            lines.append(f"{page_name}: [{v['impact']}] {v['id']} ({v['help']}), {len(v['nodes'])} node(s)")
            for n in v["nodes"][:5]:
                lines.append(f"    {n['target']}: {(n['summary'] or '').splitlines()[-1].strip()}")
    return "\n".join(lines)
