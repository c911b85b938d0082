"""Tables as Markdown and as LaTeX (booktabs)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.metrics.specs import arrow, format_value, label
from harness.report.tables import FAILED, Table


@dataclass(frozen=True)
class CellStyle:
    missing: str
    sup: str  # format string of a superscript mark
    random_mark: str
    plus_minus: str
    best: str  # format strings around the value
    second: str
    differs: str  # a printed average that differs from the mean of the printed rows beyond rounding
    stand_in: str  # inside the superscript: samples partly made by a stand-in


MARKDOWN = CellStyle("—", "<sup>{}</sup>", "*", " ± ", "**{}**", "<u>{}</u>", "<sup>≠</sup>", "‡")
LATEX = CellStyle("---", r"\textsuperscript{{{}}}", r"$^{*}$", r" $\pm$ ", r"\textbf{{{}}}", r"\underline{{{}}}", r"$^{\neq}$",
                  r"\ddag")


def _cell_text(table: Table, row: str, method: str, metric: str, mark_random: bool, style: CellStyle) -> str:
    cell = table.cell(row, method, metric)
    if cell.printed_average is not None:
        return _printed_average_text(cell, metric, style)
    if cell.state != "ok":
        if cell.state == FAILED:
            return style.missing + style.sup.format("f")
        return style.missing + (style.sup.format(f"0/{cell.planned}") if cell.not_run else "")
    text = format_value(cell.value, metric) + (style.random_mark if mark_random and cell.random else "")
    if table.spread:
        text += style.plus_minus + format_value(cell.std, metric) if cell.std is not None else ""
    marks = [f"{'f ' if cell.failed else ''}{cell.count}/{cell.planned}"] if cell.incomplete else []
    if table.spread and not cell.reported and len(cell.replicates) != table.spread:
        marks.append(f"n={len(cell.replicates)}")
    marks += ["s"] if cell.small else []
    marks += [style.stand_in] if cell.stand_in else []
    text += style.sup.format(" ".join(marks)) if marks else ""
    return {1: style.best, 2: style.second}.get(cell.rank, "{}").format(text)


def _printed_average_text(cell, metric: str, style: CellStyle) -> str:
    """A paper's printed Average: printed, and beside it the mean of the printed rows in this table, flagged when
    the two differ by more than rounding."""
    printed = format_value(cell.printed_average, metric)
    if cell.state != "ok":
        return f"{printed} (printed)"
    flag = style.differs if cell.differs_beyond_rounding else ""
    return f"{printed}{flag} (rows: {format_value(cell.value, metric)})"


def markdown_table(table: Table, mark_random: bool) -> str:
    header = ["Category"] + [f"{m} {label(k)}{arrow(k)}" for m in table.methods for k in table.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        name = f"**{row}**" if row == "Average" else row
        cells = [_cell_text(table, row, m, k, mark_random, MARKDOWN) for m in table.methods for k in table.metrics]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def tex_escape(text: str) -> str:
    """One pass, so that the braces of one replacement are not escaped by the next."""
    return re.sub(r"[\\_%&#$}{~^]", lambda m: _TEX_SPECIALS[m.group()], text)


def latex_table(table: Table, caption: str, label_id: str, mark_random: bool) -> str:
    k = len(table.metrics)
    columns = "l" + " ".join("c" * k for _ in table.methods)
    method_header = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{tex_escape(m)}}}" for m in table.methods)
    rules = " ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(table.methods)))
    metric_header = " & ".join(f"{tex_escape(label(m))}{arrow(m, latex=True)}" for _ in table.methods for m in table.metrics)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{{label_id}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",  # shrink wide tables only
             rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             f" & {method_header} \\\\", rules, f"Category & {metric_header} \\\\", r"\midrule"]
    for row in table.rows:
        if row == "Average":
            lines.append(r"\midrule")
        cells = [_cell_text(table, row, m, k, mark_random, LATEX) for m in table.methods for k in table.metrics]
        lines.append(" & ".join([tex_escape(row)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines)


def markdown_method_rows(table: Table, groups: list[tuple[str, list[str]]], mark_random: bool,
                         row: str = "Average") -> str:
    """The averages of `table` with methods as rows, in groups (Cho et al. Table 2's shape): one column per metric,
    and how many categories went into each average."""
    header = ["Method"] + [f"{label(k)}{arrow(k)}" for k in table.metrics] + ["#cat"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    for title, methods in groups:
        lines.append(f"| _{title}_ |" + " |" * (len(header) - 1))
        for method in methods:
            cells = [_cell_text(table, row, method, k, mark_random, MARKDOWN) for k in table.metrics]
            lines.append("| " + " | ".join([method, *cells, str(_categories_in(table, row, method))]) + " |")
    return "\n".join(lines)


def latex_method_rows(table: Table, groups: list[tuple[str, list[str]]], caption: str, label_id: str,
                      mark_random: bool, row: str = "Average") -> str:
    metric_header = " & ".join(f"{tex_escape(label(m))}{arrow(m, latex=True)}" for m in table.metrics)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{{label_id}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             rf"\begin{{tabular}}{{l{'c' * len(table.metrics)}c}}", r"\toprule",
             f"Method & {metric_header} & \\#cat \\\\", r"\midrule"]
    for i, (title, methods) in enumerate(groups):
        if i:
            lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{len(table.metrics) + 2}}}{{l}}{{\textit{{{tex_escape(title)}}}}} \\")
        for method in methods:
            cells = [_cell_text(table, row, method, k, mark_random, LATEX) for k in table.metrics]
            lines.append(" & ".join([tex_escape(method), *cells, str(_categories_in(table, row, method))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines)


def _categories_in(table: Table, row: str, method: str) -> int:
    """How many categories a row's values cover (not how many values: several seeds give a category several)."""
    if row == "Average":
        return table.average_counts.get(method, 0)
    return int(any(table.cell(row, method, k).state == "ok" for k in table.metrics))


def latex_document(body: list[str]) -> str:
    preamble = [r"\documentclass{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}", r"\usepackage{booktabs}",
                r"\usepackage{graphicx}", r"\begin{document}"]
    return "\n".join(preamble + ["", *body, "", r"\end{document}", ""])
