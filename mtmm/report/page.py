"""A report as a list of blocks, written as one self-contained HTML page (its PNGs embedded as data: URIs, so the
file opens offline and can be mailed on its own) or as Markdown with relative image links (to paste into a PR or
a wiki page beside the PNGs).

A block is a tuple: ("heading", text), ("text", text), ("table", columns, rows of cells as text) or
("figure", PNG file name in the report's folder, caption).
"""

import base64
import html
from pathlib import Path

from mtmm.atomic import write_text_atomically
from mtmm.report.sweep import markdown_table

STYLE = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
.source { color: #555; font-family: monospace; }"""


def write_html(path: Path, title: str, source: Path, blocks: list[tuple]) -> Path:
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="source">{html.escape(str(source))}</p>']
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "text":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append(html_table(block[1], block[2]))
        elif kind == "figure":
            name, caption = block[1], block[2]
            data = base64.b64encode((path.parent / name).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f'<figcaption>{html.escape(caption)} (<a href="{html.escape(name)}">{html.escape(name)}</a>)'
                         f'</figcaption></figure>')
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
    write_text_atomically(path, page)
    return path


def html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(text))}</td>" for text in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def write_markdown(path: Path, title: str, source: Path, blocks: list[tuple]) -> Path:
    parts = [f"# {title}", f"`{source}`"]
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(f"## {block[1]}")
        elif kind == "text":
            parts.append(block[1])
        elif kind == "table":
            parts.append(markdown_table(block[1], block[2]))
        elif kind == "figure":
            parts.append(f"![{block[2]}]({block[1]})")
    write_text_atomically(path, "\n\n".join(parts) + "\n")
    return path
