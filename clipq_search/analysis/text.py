"""Plain-text tables for the terminal (``inspect`` and run summaries)."""

from __future__ import annotations

from clipq_search.core.encoding import SizeEstimate

__all__ = ["format_size_table"]


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_size_table(sizes: SizeEstimate, *, title: str = "") -> str:
    """Per-tensor table (name, shape, p, bits, k, kept, bytes, rate) and totals."""
    rows = sizes.to_rows()
    name_w = max([len("name"), *(len(str(r["name"])) for r in rows)])
    shape_w = max([len("shape"), *(len(str(r["shape"])) for r in rows)])
    head = (
        f"{'name':<{name_w}}  {'shape':<{shape_w}}  {'p':>6}  {'bits':>4}  {'k':>3}  "
        f"{'kept':>7}  {'bytes':>10}  {'rate':>8}"
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['rate']:.1f}x"
        lines.append(
            f"{r['name']:<{name_w}}  {r['shape']:<{shape_w}}  {_fmt(r['p'], '.3f'):>6}  {_fmt(r['bits'], 'd'):>4}  "
            f"{_fmt(r['k'], 'd'):>3}  {r['kept']:>7.2%}  {r['bytes']:>10,}  {rate:>8}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"original fp32 parameters: {sizes.original_bytes:,} bytes   file: {sizes.total_bytes:,} bytes   "
        f"compression rate: {sizes.rate:.2f}x"
    )
    return "\n".join(lines)
