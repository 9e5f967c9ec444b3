"""A study's report as one self-contained HTML file (figures embedded as base64 PNG) or one PNG, written whole."""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
import textwrap
from pathlib import Path

import optuna

from regsearch._errors import ConfigError
from regsearch.report._figures import build_sections, new_figure, png_bytes
from regsearch.report._views import STATE, Section, summary_lines, top_table

logger = logging.getLogger("regsearch")

FORMATS = ("html", "png")


def finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in (STATE.COMPLETE, STATE.PRUNED))


def render(study: optuna.Study, fmt: str = "html") -> bytes:
    """The report of `study` as the bytes of an HTML file or of a PNG image."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; known: {', '.join(FORMATS)}")
    if not finished(study):
        raise ConfigError(f"study {study.study_name!r} has no finished trials to report on")
    views, sections = build_sections(study)
    header = summary_lines(study, views)
    table = top_table(views)
    if fmt == "png":
        return _stacked_png(study.study_name, header, table, sections)
    return _html(study.study_name, header, table, sections).encode("utf-8")


def _img(section: Section) -> str:
    if section.png is None:
        return ""
    data = base64.b64encode(section.png).decode("ascii")
    return f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}">'


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222}"
          "img{max-width:100%;height:auto;display:block;margin:.5em 0 1.5em}"
          "pre{background:#f5f5f5;padding:.7em;overflow-x:auto;font-size:.85em}"
          ".note{color:#555;max-width:60em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")


def _html(name: str, header: list[str], table: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>regsearch report: {html.escape(name)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>", "<body>",
        f'<header id="summary"><h1>regsearch report: {html.escape(name)}</h1>',
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in header) + "</ul>",
        f"<h3>Top trials</h3><pre>{html.escape(table)}</pre></header>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        parts.append(f'<p class="note">{html.escape(s.note)}</p>{_img(s)}')
        for child in s.children:
            parts.append(f'<section id="{child.key}"><h3>{html.escape(child.title)}</h3>{_img(child)}</section>')
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _text_png(title: str, lines: list[str], mono: str = "") -> bytes:
    """A figure holding only text (the header, or a section that has no figure), for the single-PNG report; long
    lines (the confirmation's sentence) are wrapped, never cut."""
    lines = [part for line in lines for part in textwrap.wrap(line, 150, subsequent_indent="  ") or [""]]
    rows = len(lines) + (mono.count("\n") + 2 if mono else 0)
    fig = new_figure(0.9 + 0.22 * rows)
    fig.text(0.01, 1 - 0.35 / fig.get_figheight(), title, fontsize="x-large", weight="bold", va="top")
    text = "\n".join(lines)
    mono = "\n".join(line if len(line) <= 170 else line[:167] + "..." for line in mono.splitlines())
    fig.text(0.01, 1 - 0.75 / fig.get_figheight(), text, va="top", fontsize="medium")
    if mono:
        y = 1 - (0.85 + 0.22 * (len(lines) + 0.5)) / fig.get_figheight()
        fig.text(0.01, y, mono, va="top", family="monospace", fontsize="small")
    fig.set_layout_engine("none")
    return png_bytes(fig)


def _stacked_png(name: str, header: list[str], table: str, sections: list[Section]) -> bytes:
    from PIL import Image

    pngs = [_text_png(f"regsearch report: {name}", header, table)]
    for s in sections:
        if s.png is not None:
            pngs.append(s.png)
        elif not s.children:
            pngs.append(_text_png(s.title, [s.note]))
        pngs += [c.png for c in s.children if c.png is not None]
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    buffer = io.BytesIO()
    # an adaptive 256-colour palette: line plots lose nothing visible, the file shrinks about 3x
    sheet.quantize(colors=256).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def file_name(study_name: str, fmt: str = "html") -> str:
    """`<study>-report.<fmt>`, with any character that could leave the folder replaced."""
    safe = re.sub(r"[^\w.-]", "_", study_name).lstrip(".") or "study"
    return f"{safe}-report.{fmt}"


def write(study: optuna.Study, path: str | os.PathLike[str], fmt: str = "html") -> Path:
    """Render the report and write it to `path` (replacing the file whole, never leaving half of one)."""
    path = Path(path)
    data = render(study, fmt)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path
