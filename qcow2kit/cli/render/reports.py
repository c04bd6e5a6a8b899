"""qcow2kit's own reports (no qemu-img counterpart): bench order and rmap."""

from __future__ import annotations

from typing import Any, Mapping

# --------------------------------------------------------------------------- bench order


def plain_json(obj: Any) -> str:
    """Ordinary indented JSON (for qcow2kit's own objects, which qemu-img has no form of)."""
    import json
    return json.dumps(obj, indent=2)


def render_bench_order_human(r: Mapping[str, Any]) -> str:
    """The human form of ``qcow2kit bench order``."""
    def secs(v: Any) -> str:
        return "-" if v is None else f"{v:.2f} s"

    g, h = r["guest"], r["host"]
    lines = [f"files: {', '.join(r['files'])}",
             f"{'order':<8}{'requests':>12}{'bytes':>16}{'model':>14}{'measured':>14}"]
    for name, d in (("guest", g), ("host", h)):
        lines.append(f"{name:<8}{d['requests']:>12}{d['bytes']:>16}"
                     f"{secs(d['model_seconds']):>14}{secs(d['measured_seconds']):>14}")
    lines.append(f"sequential bound: {secs(r['sequential_bound_seconds'])}")
    if h["model_seconds"]:
        lines.append(f"modelled speed-up of host order: {g['model_seconds'] / h['model_seconds']:.1f}x")
    if g["measured_seconds"] and h["measured_seconds"]:
        lines.append(f"measured here: {g['measured_seconds'] / h['measured_seconds']:.2f}x "
                     f"(page cache: {r['cache']})")
    m = r["model"]
    lines.append("model: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    p = r.get("planning")
    if p and p.get("source") == "rmap":
        lines.append("host-order planning: from the reverse map (no L2 scan)")
    elif p:
        lines.append(f"host-order planning: {p['passes']} pass(es) over the L2 tables, "
                     f"{p['windows']} window(s) ({p.get('reason', '')})")
    return "\n".join(lines) + "\n"


def render_rmap_human(r: Mapping[str, Any]) -> str:
    """The human form of ``qcow2kit rmap``."""
    lines = []
    if r["action"] == "drop":
        lines.append("reverse map removed" if r["dropped"] else "no reverse map to remove")
        return "\n".join(lines) + "\n"
    m = r["rmap"]
    if not m["present"]:
        lines.append(f"reverse map: {m['reason']}")
    else:
        state = "valid" if m["valid"] else m["reason"]
        lines.append(f"reverse map: {state}")
        lines.append(f"  version {m['version']}, {m['size']} bytes at {m['offset']:#x}")
        lines.append(f"  {m['data-records']} data records, {m['compressed-records']} "
                     f"compressed records")
        if m.get("clusters") is not None:
            lines.append(f"  {m['clusters']} data clusters mapped ({m['units']} units of "
                         f"{m['unit-size']} bytes)")
    if r["action"] == "verify":
        if r["matches"]:
            lines.append("verify: the map matches the L2 tables")
        else:
            lines.append("verify: the map does NOT match the L2 tables:")
            lines.extend(f"  {d}" for d in r["differences"])
    return "\n".join(lines) + "\n"
