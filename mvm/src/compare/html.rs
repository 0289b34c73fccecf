//! The comparison as one self-contained HTML page: the header, a bar chart per cost (inline SVG),
//! the table of every measurement with the probes' reasons as tooltips, the notes, how to read
//! it, and the comparison itself as JSON in a `<script type="application/json">` element. No
//! outside resources: no scripts, fonts, images or style sheets from anywhere.

use std::fmt::Write as _;

use engine::compare::{Comparison, ModeReport};
use engine::spec::Isolation;

use super::rows::{column_title, notes, sections, Chart, Row};
use super::table::header;

/// The bar colour of each mode (also in the table's column titles).
pub fn mode_color(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Process => "#4e79a7",
        Isolation::Container => "#f28e2b",
        Isolation::Vm => "#59a14f",
    }
}

const STYLE: &str = "
body { font-family: sans-serif; margin: 2em; color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; }
pre.meta { color: #555; margin-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts svg { border: 1px solid #ddd; background: #fafafa; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
tr.section th { background: #eee; padding-top: 0.6em; }
td.verdict { color: #555; font-style: italic; }
td.allowed, td.not-enforced { background: #f8d0d0; }
td.blocked, td.enforced { background: #d4efd4; }
td.error { background: #f4e8c0; }
td[title] { cursor: help; }
";

/// The whole page.
pub fn render(c: &Comparison) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>mvm compare: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>mvm compare</h1>\n<pre class=\"meta\">{}</pre>\n",
        esc(&c.image),
        esc(&header(c))
    );
    let all = sections(c);
    h.push_str("<h2>Cost</h2>\n<div class=\"charts\" id=\"charts\">\n");
    for r in all.iter().flat_map(|s| &s.rows) {
        if let Some(chart) = &r.chart {
            h.push_str(&bar_chart(r, chart, &c.modes));
        }
    }
    h.push_str(
        "</div>\n<h2>Every measurement</h2>\n<table id=\"measurements\">\n<thead><tr><th></th>",
    );
    for m in &c.modes {
        let _ = write!(
            h,
            "<th style=\"color:{}\">{}</th>",
            mode_color(m.isolation),
            esc(&column_title(m))
        );
    }
    h.push_str("<th>verdict</th></tr></thead>\n<tbody>\n");
    let span = c.modes.len() + 2;
    for s in &all {
        let _ = writeln!(
            h,
            "<tr class=\"section\"><th colspan=\"{span}\">{}</th></tr>",
            esc(&s.title)
        );
        for r in &s.rows {
            h.push_str(&table_row(r));
        }
    }
    h.push_str("</tbody>\n</table>\n");
    let notes = notes(c);
    if !notes.is_empty() {
        h.push_str("<h2>Notes</h2>\n<ul>\n");
        for n in notes {
            let _ = writeln!(h, "<li>{}</li>", esc(&n));
        }
        h.push_str("</ul>\n");
    }
    let _ = write!(h, "<h2>How to read this</h2>\n{HOW_TO_READ}\n");
    // The data itself; `<` escaped so that no string can close the element.
    let json = serde_json::to_string(c)
        .unwrap_or_default()
        .replace('<', "\\u003c");
    let _ = write!(
        h,
        "<script type=\"application/json\" id=\"comparison\">{json}</script>\n</body>\n</html>\n"
    );
    h
}

const HOW_TO_READ: &str = "<p>Each column is one isolation mode running the same image with the \
same limits; every value was measured in those runs. <b>What the workload sees</b> comes from \
inside the sandbox. <b>Limits</b>: a child process goes past the memory and pids limits and busy \
processes try to use more CPU than given; <i>error</i> means the check was inconclusive (for \
example under other load). <b>Attack surface</b>: <i>host syscalls, direct</i> counts the \
distinct host-kernel system calls the workload can make itself: all of them for a plain process, \
what the seccomp filter lets through in a container, none in a VM, whose guest kernel serves \
them; the VMM's own filter is the surface the guest reaches indirectly. <b>Escape probes</b>: \
<i>allowed</i> means the workload did it (for a host resource: it reached the real one, proven \
by a nonce only mvm knew); hover over a cell for the reason. <b>Cost</b>: medians over the runs; \
start is the time to the workload's first output, exit the time until the run ended (without the \
probe's own work), host memory the proportional set size of every host process the run started. \
On a host that emulates guest kernel mode (PVM) the VM's times are not those of real hardware.</p>";

fn table_row(r: &Row) -> String {
    let mut h = format!("<tr><th>{}</th>", esc(&r.label));
    for (i, cell) in r.cells.iter().enumerate() {
        let class = cell.replace(' ', "-");
        let class = match class.as_str() {
            "allowed" | "blocked" | "error" | "enforced" | "not-enforced" => class,
            _ => String::new(),
        };
        let detail = r.details.get(i).filter(|d| !d.is_empty());
        let _ = write!(h, "<td");
        if !class.is_empty() {
            let _ = write!(h, " class=\"{class}\"");
        }
        if let Some(d) = detail {
            let _ = write!(h, " title=\"{}\"", esc(d));
        }
        let _ = write!(h, ">{}</td>", esc(cell));
    }
    let _ = writeln!(h, "<td class=\"verdict\">{}</td></tr>", esc(&r.verdict));
    h
}

/// One horizontal bar per mode, on a linear scale from zero, each labelled with its value as the
/// table shows it.
fn bar_chart(row: &Row, chart: &Chart, modes: &[ModeReport]) -> String {
    let title = row.label.as_str();
    const W: f64 = 380.0;
    const LABEL: f64 = 80.0;
    const BAR_MAX: f64 = 200.0;
    const BAR_H: f64 = 18.0;
    const GAP: f64 = 8.0;
    const TOP: f64 = 28.0;
    let max = chart
        .values
        .iter()
        .flatten()
        .copied()
        .fold(0.0f64, f64::max);
    let rows = modes.len() as f64;
    let height = TOP + rows * (BAR_H + GAP) + GAP;
    let better = if chart.higher_is_better {
        "more is better"
    } else {
        "less is better"
    };
    let mut s = format!(
        "<svg width=\"{W}\" height=\"{height}\" \
         role=\"img\" aria-label=\"{t}\">\n<text x=\"8\" y=\"18\" font-size=\"13\" \
         font-weight=\"bold\">{t}</text><text x=\"{x}\" y=\"18\" font-size=\"11\" \
         text-anchor=\"end\" fill=\"#777\">{better}</text>\n",
        t = esc(title),
        x = W - 8.0,
    );
    for (i, (m, v)) in modes.iter().zip(&chart.values).enumerate() {
        let y = TOP + i as f64 * (BAR_H + GAP);
        let _ = write!(
            s,
            "<text x=\"8\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 13.0,
            m.isolation
        );
        match v {
            Some(v) => {
                let w = if max > 0.0 {
                    (v / max * BAR_MAX).max(1.0)
                } else {
                    1.0
                };
                let _ = writeln!(
                    s,
                    "<rect class=\"bar\" x=\"{LABEL}\" y=\"{y}\" width=\"{w:.1}\" height=\"{BAR_H}\" \
                     fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{}</text>",
                    mode_color(m.isolation),
                    LABEL + w + 4.0,
                    y + 13.0,
                    esc(row.cells.get(i).map_or("", String::as_str)),
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "<text x=\"{LABEL}\" y=\"{}\" font-size=\"11\" fill=\"#999\">not measured</text>",
                    y + 13.0
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Text made safe for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
